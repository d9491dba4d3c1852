"""`noop-rt export`: a NoOp checkpoint -> a self-contained ONNX bundle, validated against PyTorch.

Graphs (see `graphs.py`): vae_encoder (image -> z0), noise (z0 -> eps_D + g_phi(z0), eps_D baked in as a constant),
unet (raw model output), text_encoder (+ tokenizer/) so new prompts embed at run time. TorchScript exporter
(`dynamo=False`, as the SD deployers use for the UNet), opset >= 17. Everything is written into a temp folder next to
the destination and renamed into place only after validation passes: an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noop_rt import __version__
from noop_rt.backbone import Backbone, load_backbone
from noop_rt.bundle import FORMAT, MANIFEST, VERSION, Bundle, sha256_file, write_json_atomic
from noop_rt.checkpoint import NoopCheckpoint, load_checkpoint, same_backbone
from noop_rt.data import IMAGE_SUFFIXES, load_image
from noop_rt.errors import BadInputError, CheckpointError, ValidationFailedError
from noop_rt.graphs import GraphSpec, TextEncoderGraph, UNetGraph, graph_specs

TWO_GIB = 2 * 1024**3
# Max relative error (max |onnx - torch| / max |torch|) allowed per graph, and the top-1 agreement required.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
AGREEMENT = {"fp32": 1.0, "fp16": 0.995}


@dataclass
class ExportOptions:
    opset: int = 17
    precision: str = "fp32"  # "fp32" | "fp16"
    force: bool = False
    images_per_batch: int = 4  # the bundle's max UNet batch is this x C (TensorRT profile max)
    tolerance: float | None = None  # None: TOLERANCE[precision]
    min_agreement: float | None = None  # None: AGREEMENT[precision]
    validate_images: list[Path] = field(default_factory=list)  # empty: the demo examples, else synthetic images
    external_data_threshold: int = TWO_GIB


@dataclass
class ExportReport:
    out: Path
    cached: bool
    validation: dict[str, Any]
    seconds: float


def _cache_key(ckpt_sha: str, options: ExportOptions) -> str:
    parts = [ckpt_sha, options.precision, str(options.opset), str(options.images_per_batch), __version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError, OSError):  # PermissionError included: not ours to judge, leave it
        return True
    return True


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp folder beside `out`, removed on any failure (an interrupted export leaves no half bundle). Staging
    folders of exports that were killed outright (SIGKILL, out of memory: no cleanup ran) are removed here."""
    out.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")  # on shared storage only this host's PIDs can be checked
    for stale in out.parent.glob(f".{out.name}.export-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.export-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an old bundle is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_graph(module: nn.Module, spec: GraphSpec, folder: Path, opset: int, sample_batch: int,
                 external_data_threshold: int = TWO_GIB) -> list[str]:
    """Export one graph with TorchScript (dynamo=False) into `folder`; returns the files written (the graph, plus
    one external data file `NAME.onnx.data` when the graph reaches `external_data_threshold` bytes)."""
    import onnx

    work = folder / f".{spec.name}"
    work.mkdir()
    path = work / spec.file
    args = spec.sample_inputs(sample_batch)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks in diffusers
        torch.onnx.export(module.eval(), args, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    produced = list(work.iterdir())
    size = sum(p.stat().st_size for p in produced)
    data_name = f"{spec.file}.data"
    if size >= external_data_threshold or len(produced) > 1:
        # One external data file (the exporter may write one file per tensor past 2 GB).
        model = onnx.load(str(path), load_external_data=True)
        onnx.save_model(model, str(folder / spec.file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        written = [spec.file, data_name]
    else:
        path.rename(folder / spec.file)
        written = [spec.file]
    shutil.rmtree(work)
    onnx.checker.check_model(str(folder / spec.file))
    return written


def _graph_modules(backbone: Backbone, ckpt: NoopCheckpoint, precision: str) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {
        "vae_encoder": backbone.encoder,
        "noise": ckpt.noise_model(),
        "unet": UNetGraph(backbone.unet),
        "text_encoder": TextEncoderGraph(backbone.text_encoder),
    }
    if precision == "fp16":
        modules = {name: copy.deepcopy(m).half() for name, m in modules.items()}
        text = modules["text_encoder"].text_encoder
        if hasattr(text, "set_attn_implementation"):
            # transformers' SDPA path builds its causal mask in fp32, which the TorchScript exporter turns into
            # LayerNormalization nodes of mixed fp16/fp32 type (an invalid graph); eager attention stays fp16.
            text.set_attn_implementation("eager")
    return {name: m.eval() for name, m in modules.items()}


def _validation_images(options: ExportOptions, ckpt: NoopCheckpoint, resolution: int) -> tuple[torch.Tensor, str]:
    """The images the classifier's top-1 agreement is measured on: given ones; for the demo the 360 held-out digits
    (fp16, where agreement below 100 % is expected and must be measured) or the 10 examples (fp32, fast); else
    synthetic images."""
    paths = list(options.validate_images)
    what = "given images"
    if not paths and ckpt.backbone_source == "demo" and options.precision == "fp16":
        from noop_rt.demo.digits import split_tensors

        held_out, _ = split_tensors("test")
        return held_out, f"{len(held_out)} held-out demo digits"
    if not paths and ckpt.backbone_source == "demo":
        from noop_rt.demo import EXAMPLES_DIR

        paths = sorted(EXAMPLES_DIR.glob("*.png"))
        what = "demo examples"
    if paths:
        return torch.stack([torch.from_numpy(load_image(p, resolution)) for p in paths]), f"{len(paths)} {what}"
    gen = torch.Generator().manual_seed(0)
    return torch.rand((8, 3, resolution, resolution), generator=gen) * 2 - 1, "8 synthetic images (uniform noise)"


def _rel_error(ort_out: np.ndarray, ref: torch.Tensor) -> dict[str, float]:
    ref_np = ref.detach().float().cpu().numpy()
    diff = np.abs(ort_out.astype(np.float32) - ref_np)
    scale = float(np.abs(ref_np).max()) or 1.0
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "ref_max_abs": scale}


def validate_bundle(bundle_dir: Path, backbone: Backbone, ckpt: NoopCheckpoint, images: torch.Tensor,
                    what: str, precision: str, tolerance: float, min_agreement: float) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs fp32 PyTorch on real inputs, per graph, and top-1 agreement of the full classifier."""
    from noop_rt.runtime.classifier import Classifier, ClassSpec, StrategyOptions
    from noop_rt.runtime.onnx_backend import OnnxBackend
    from noop_rt.runtime.torch_backend import TorchBackend

    bundle = Bundle.open(bundle_dir, verify=False)
    ort_backend = OnnxBackend(bundle, device="cpu")
    noise = ckpt.noise_model()
    c = ckpt.class_embeddings.shape[0]
    # Run everything at the bundle's own batch sizes (images per batch x C): at 512 px the UNet's attention at a
    # larger batch does not fit a 24 GB machine.
    step = max(1, int(bundle.manifest["max_batch"]) // c)
    first = images[:step]
    graphs: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        z0_ref = backbone.encode(first)
        graphs["vae_encoder"] = _rel_error(ort_backend.run("vae_encoder", image=first)[0], z0_ref)
        eps_ref = noise(z0_ref)
        graphs["noise"] = _rel_error(ort_backend.run("noise", z0=z0_ref)[0], eps_ref)
        emb = ckpt.class_embeddings
        abar = backbone.alphas_cumprod[ckpt.t_star]
        z_t = (abar.sqrt() * z0_ref[:1] + (1 - abar).sqrt() * eps_ref[:1]).expand(c, -1, -1, -1)
        t = torch.full((c,), float(ckpt.t_star))
        unet_ref = backbone.unet(z_t, t, encoder_hidden_states=emb).sample
        graphs["unet"] = _rel_error(ort_backend.run("unet", sample=z_t, timestep=t, encoder_hidden_states=emb)[0],
                                    unet_ref)
        ids = backbone.tokenize(ckpt.prompts)
        text_ref = backbone.text_encoder(ids)[0]
        graphs["text_encoder"] = _rel_error(ort_backend.run("text_encoder", input_ids=ids)[0], text_ref)
    spec = ClassSpec.from_checkpoint(ckpt)
    options = StrategyOptions(method="noop")
    ref = Classifier(TorchBackend(backbone, noise), spec, max_batch=step * c)
    ort = Classifier(ort_backend, spec, max_batch=step * c)
    same, gaps = [], []
    for i in range(0, len(images), step):
        ref_scores, _ = ref.score(images[i:i + step], options)
        ort_scores, _ = ort.score(images[i:i + step], options)
        same.append(ref_scores.predictions() == ort_scores.predictions())
        gaps.append((ref_scores.errors - ort_scores.errors).abs().max())
    agree = float(torch.cat(same).float().mean())
    err_gap = float(torch.stack(gaps).max())
    for g in graphs.values():
        g["passed"] = g["max_rel"] <= tolerance
    report = {
        "precision": precision, "runtime": "onnxruntime " + _ort_version() + " CPUExecutionProvider",
        "reference": "PyTorch fp32 " + torch.__version__, "images": what, "tolerance_max_rel": tolerance,
        "graphs": graphs,
        "classifier": {"top1_agreement": agree, "min_agreement": min_agreement, "max_error_gap": err_gap,
                       "passed": agree >= min_agreement},
    }
    report["passed"] = all(g["passed"] for g in graphs.values()) and report["classifier"]["passed"]
    return report


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def print_validation(report: dict[str, Any], stream: Any = sys.stderr) -> None:
    for name, g in report["graphs"].items():
        mark = "✓" if g["passed"] else "✗"
        print(f"  {mark} {name:<13} max abs {g['max_abs']:.2e}  max rel {g['max_rel']:.2e} "
              f"(tolerance {report['tolerance_max_rel']:.0e})", file=stream)
    c = report["classifier"]
    mark = "✓" if c["passed"] else "✗"
    print(f"  {mark} classifier    top-1 agreement {100 * c['top1_agreement']:.1f} % on {report['images']} "
          f"(required {100 * c['min_agreement']:.1f} %), max error gap {c['max_error_gap']:.2e}", file=stream)


def export_bundle(ckpt_path: str | Path, out: str | Path, options: ExportOptions | None = None,
                  log: Any = sys.stderr) -> ExportReport:
    """Export, validate, publish. Raises ValidationFailedError (exit 3) when parity fails; nothing is published."""
    options = options or ExportOptions()
    if options.precision not in TOLERANCE:
        raise BadInputError(f"unknown precision {options.precision!r} (fp32 or fp16)")
    if options.opset < 17:
        raise BadInputError("--opset must be >= 17 (LayerNormalization keeps fp16 TensorRT engines from overflowing)")
    start = time.perf_counter()
    ckpt_path, out = Path(ckpt_path).expanduser(), Path(out).expanduser()
    ckpt = load_checkpoint(ckpt_path)
    ckpt_sha = sha256_file(ckpt_path)
    key = _cache_key(ckpt_sha, options)
    if (out / MANIFEST).is_file() and not options.force:
        try:
            cached = Bundle.open(out)
        except BadInputError:
            cached = None
        if cached is not None and cached.manifest.get("cache_key") == key:
            print(f"found cached bundle {out} (same checkpoint and options; use --force to re-export)", file=log)
            validation = json.loads((out / "validation.json").read_text())
            return ExportReport(out, True, validation, time.perf_counter() - start)
        raise BadInputError(f"{out} already holds another bundle; use --force to replace it")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()) and not options.force:
        raise BadInputError(f"{out} exists and is not a bundle; choose another --out or use --force")

    backbone = load_backbone(ckpt.backbone_source)
    reason = same_backbone(ckpt.backbone_fingerprint, backbone)
    if reason is not None:
        raise CheckpointError(f"{ckpt_path} does not match its backbone {backbone.source}: {reason}")
    emb = ckpt.class_embeddings
    c, max_tokens, text_dim = emb.shape
    specs = graph_specs(backbone.latent_shape, backbone.resolution, max_tokens, text_dim, options.precision)
    modules = _graph_modules(backbone, ckpt, options.precision)
    images, what = _validation_images(options, ckpt, backbone.resolution)
    tolerance = options.tolerance if options.tolerance is not None else TOLERANCE[options.precision]
    min_agreement = options.min_agreement if options.min_agreement is not None else AGREEMENT[options.precision]
    command = (f"noop-rt export --ckpt {ckpt_path} --out {out} --opset {options.opset} "
               f"--{options.precision}")
    print(f"exporting {ckpt_path} -> {out} ({options.precision}, opset {options.opset}); equivalent: {command}",
          file=log)
    with _staging(out) as tmp:
        files: list[str] = []
        for name in ("vae_encoder", "noise", "unet", "text_encoder"):
            t0 = time.perf_counter()
            files += export_graph(modules[name], specs[name], tmp, options.opset, sample_batch=2,
                                  external_data_threshold=options.external_data_threshold)
            print(f"  exported {specs[name].file} in {time.perf_counter() - t0:.1f} s", file=log)
        backbone.tokenizer.save_pretrained(tmp / "tokenizer")
        np.save(tmp / "class_embeddings.npy", emb.float().numpy())
        files += ["class_embeddings.npy", *sorted(f"tokenizer/{p.name}" for p in (tmp / "tokenizer").iterdir())]
        manifest = {
            "format": FORMAT, "version": VERSION, "cache_key": key, "noop_rt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_ckpt": {"path": str(ckpt_path), "sha256": ckpt_sha},
            "backbone": {"source": ckpt.backbone_source, "kind": backbone.kind,
                         "prediction_type": backbone.prediction_type},
            "classes": ckpt.classes, "prompts": ckpt.prompts, "template": ckpt.template,
            "prompt_tuned": ckpt.prompt_ctx is not None, "t_star": ckpt.t_star,
            "abar_t_star": float(backbone.alphas_cumprod[ckpt.t_star]), "loss": ckpt.loss, "tau": ckpt.tau,
            "resolution": backbone.resolution, "latent_shape": list(backbone.latent_shape),
            "max_tokens": max_tokens, "precision": options.precision, "opset": options.opset,
            "max_batch": options.images_per_batch * c, "opt_batch": c,
            "alphas_cumprod": [float(a) for a in backbone.alphas_cumprod],
            "graphs": {name: spec.to_json() for name, spec in specs.items()},
            "build_config": {"command": command, "exporter": "torch.onnx TorchScript (dynamo=False)",
                             "torch": torch.__version__, "onnx_opset": options.opset},
            "files": {},
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        validation = validate_bundle(tmp, backbone, ckpt, images, what, options.precision, tolerance, min_agreement)
        write_json_atomic(tmp / "validation.json", validation)
        manifest["files"] = {f: sha256_file(tmp / f) for f in [*files, "validation.json"]}
        write_json_atomic(tmp / MANIFEST, manifest)
        print("validation (onnxruntime vs PyTorch fp32):", file=log)
        print_validation(validation, log)
        if not validation["passed"]:
            raise ValidationFailedError(
                f"export validation failed (see the ✗ lines); nothing was written to {out}. Relax with "
                "--tolerance/--min-agreement if the gap is expected")
        _publish(tmp, out)
    return ExportReport(out, False, validation, time.perf_counter() - start)


def collect_images(folder: Path) -> list[Path]:
    """Every image under `folder` (recursively), sorted."""
    if not folder.is_dir():
        raise BadInputError(f"validation image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BadInputError(f"no images under {folder}")
    return paths
