"""`noop-rt export`: a NoOp checkpoint -> a self-contained ONNX bundle (format 2), validated against PyTorch.

Graphs (`runtime/graph_specs.py` describes them, `train/graph_modules.py` builds their torch modules): `classifier`, the
whole NoOp pass, image -> errors, probs (any ONNX runtime serves the classifier from this one file plus the weights);
`scorer`, class errors of (z0, eps, t) rows for the zero-shot strategies; `vae_encoder`, `noise`, `text_encoder` (+
tokenizer/) so other losses and new prompts run too. The weights are stored once (`weights.bin`, shared by every graph).
TorchScript exporter (`dynamo=False`, as the SD deployers use for the UNet), opset >= 17. Everything is written into a
temp folder next to the destination and renamed into place only after validation passes: an interrupted export leaves
nothing behind."""

from __future__ import annotations

import contextlib
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
from noop_rt.build.shared_weights import WeightsFile
from noop_rt.demo import model_name
from noop_rt.runtime.backends.torch_runner import TorchRunner
from noop_rt.runtime.bundle import FORMAT, LABEL_KEYS, MANIFEST, VERSION, Bundle, sha256_file, write_json_atomic
from noop_rt.runtime.choices import LOSSES
from noop_rt.runtime.errors import BadInputError, ValidationFailedError
from noop_rt.runtime.graph_model import default_preprocessing
from noop_rt.runtime.graph_specs import CLASSIFIER, ENCODER, GRAPH_NAMES, NOISE, SCORER, TEXT_ENCODER, GraphSpec
from noop_rt.runtime.images import IMAGE_SUFFIXES, load_image
from noop_rt.train.backbones import Backbone
from noop_rt.train.checkpoint import NoopCheckpoint, checkpoint_backbone, load_checkpoint
from noop_rt.train.graph_modules import TRACE_DIMS, backbone_specs, graph_modules, sample_inputs

# Max relative error (max |onnx - torch| / max |torch|) allowed per graph, and the top-1 agreement required.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 1e-3}
AGREEMENT = {"fp32": 1.0, "fp16": 0.995, "int8": 0.99}
# An int8 bundle quantizes the classifier graph only: its errors are compared by top-1 agreement on the validation
# split, not by a per-value tolerance (the other graphs stay fp32 and keep theirs).


@dataclass
class ExportOptions:
    opset: int = 17
    precision: str = "fp32"  # "fp32" | "fp16" | "int8" (the classifier graph quantized; the others fp32)
    force: bool = False
    images_per_batch: int = 4  # the bundle's max UNet batch is this x C (TensorRT profile max)
    tolerance: float | None = None  # None: TOLERANCE[precision]
    min_agreement: float | None = None  # None: AGREEMENT[precision]
    validate_images: list[Path] = field(default_factory=list)  # empty: the demo examples, else synthetic images
    calibrate_images: list[Path] = field(default_factory=list)  # int8: empty: the checkpoint's own images
    lora: Path | None = None  # the LoRA the checkpoint was trained with, when its recorded file moved
    text_encoder: bool = True  # False: no text-encoder graph nor tokenizer (the trained classes' embeddings only)


@dataclass
class ExportReport:
    out: Path
    cached: bool
    validation: dict[str, Any]
    seconds: float


def _cache_key(ckpt_sha: str, options: ExportOptions) -> str:
    parts = [ckpt_sha, options.precision, str(options.opset), str(options.images_per_batch), __version__]
    if not options.text_encoder:
        parts.append("no-text-encoder")
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


def export_graph(module: nn.Module, spec: GraphSpec, work: Path, opset: int, weights: WeightsFile | None = None
                 ) -> Path:
    """Trace one graph with TorchScript (dynamo=False) into `work/<graph>/<file>`; returns its path. With `weights`,
    its parameters are written into that file tensor by tensor (`torchscript_params`) and the graph saved refers to
    them; without (or where torch's exporter cannot be hooked), the exporter stores them itself: inside the graph
    under 2 GB, in its own files beside it past 2 GB (`WeightsFile.add` re-homes both)."""
    from noop_rt.build.torchscript_params import attach_params, exported_params

    folder = work / spec.name
    folder.mkdir()
    path = folder / spec.file
    args = sample_inputs(spec, TRACE_DIMS, _device_of(module))
    with warnings.catch_warnings(), torch.no_grad(), exported_params() as captured:
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks in diffusers
        stream = weights is not None and captured is not None
        torch.onnx.export(module.eval(), args, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False, do_constant_folding=True, export_params=not stream)
    if stream and weights is not None and captured is not None:
        import onnx

        model = onnx.load(str(path))
        attach_params(model, captured.pop("params"), weights)
        onnx.save_model(model, str(path))
    return path


def onnx_load(path: Path, external: bool) -> Any:
    """An exported graph's ModelProto; `external=False` leaves weights stored outside it where they are."""
    import onnx

    return onnx.load(str(path), load_external_data=external)


def _drop_vae_decoder(backbone: Backbone) -> None:
    """The bundle encodes images only: the VAE's decoder (about 200 MB in fp32 for SD) is freed before export."""
    vae = getattr(backbone.encoder, "vae", None)
    if vae is not None and getattr(vae, "decoder", None) is not None:
        vae.decoder = None
        if hasattr(vae, "post_quant_conv"):
            vae.post_quant_conv = None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps freed memory in its arenas otherwise), so the
    validation sessions reuse the pages the torch modules held."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def bake_input(model: Any, name: str, value: np.ndarray) -> None:
    """Make graph input `name` a constant of the graph: an initializer of that name, and no longer an input (so a
    session fed `image` alone runs silently, and the engine may fold what depends on it). New class sets run through
    the scorer graph instead."""
    from onnx import numpy_helper

    inputs = [i for i in model.graph.input if i.name == name]
    if not inputs:
        raise ValueError(f"graph has no input {name}")
    model.graph.input.remove(inputs[0])
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))


def baked_classifier_spec(spec: GraphSpec) -> GraphSpec:
    """The classifier graph's description once its class embeddings are baked in: `image` in, errors and probs out."""
    return GraphSpec(spec.name, tuple(t for t in spec.inputs if t.name != "class_embeddings"), spec.outputs)


def set_labels(model: Any, classes: list[str], prompts: list[str]) -> None:
    """Write the class names and prompts into the classifier graph's metadata_props, so that a manifest.json edited
    after export (two names swapped relabel every image) is refused when the bundle is opened."""
    for key, value in ((LABEL_KEYS[0], classes), (LABEL_KEYS[1], prompts)):
        model.metadata_props.add(key=key, value=json.dumps(list(value)))


def _validation_images(options: ExportOptions, ckpt: NoopCheckpoint, resolution: int) -> tuple[np.ndarray, str]:
    """The images the classifier's top-1 agreement is measured on: given ones; for the demo the 360 held-out digits
    (fp16, where agreement below 100 % is expected and must be measured) or the 10 examples (fp32, fast); else
    synthetic images."""
    paths = list(options.validate_images)
    what = "given images"
    if options.precision == "int8":  # the validation split decides whether INT8 holds
        from noop_rt.build.quantize import checkpoint_images

        return checkpoint_images(ckpt, resolution, ("val",), paths)
    if not paths and ckpt.backbone_source == "demo" and options.precision == "fp16":
        from noop_rt.demo.digits import split_tensors

        held_out, _ = split_tensors("test")
        return held_out.numpy(), f"{len(held_out)} held-out demo digits"
    if not paths and ckpt.backbone_source == "demo":
        from noop_rt.demo import EXAMPLES_DIR

        paths = sorted(EXAMPLES_DIR.glob("*.png"))
        what = "demo examples"
    if paths:
        return np.stack([load_image(p, resolution) for p in paths]), f"{len(paths)} {what}"
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (8, 3, resolution, resolution)).astype(np.float32), "8 synthetic images (uniform noise)"


def _rel_error(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float32) - ref.astype(np.float32))
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "ref_max_abs": scale}


@dataclass
class Reference:
    """The PyTorch fp32 outputs every validation check compares with, computed before the graphs are exported so
    that the torch modules are gone (their memory returned) when the onnxruntime sessions open."""

    images: np.ndarray  # the validation images
    what: str  # what they are, for the report
    step: int  # images per classifier batch (the bundle's max batch over its classes)
    z0: np.ndarray  # vae_encoder(images[:step])
    eps: np.ndarray  # noise(z0)
    timesteps: np.ndarray  # mixed timesteps for the scorer rows
    ids: np.ndarray | None  # the trained prompts' token ids (None: no text encoder exported)
    text: np.ndarray | None  # text_encoder(ids)
    classifier: list[np.ndarray]  # errors per batch of `step` images
    scorer: dict[str, np.ndarray]  # errors_<loss> of (z0, eps, timesteps, class embeddings)


def reference_outputs(reference: TorchRunner, images: np.ndarray, what: str, step: int, ids: np.ndarray | None,
                      emb: np.ndarray, num_train_timesteps: int, losses: tuple[str, ...] = LOSSES) -> Reference:
    """Run the fp32 torch modules on every validation input (the same inputs as `validate_bundle` feeds)."""
    first = images[:step]
    z0 = reference.run(ENCODER, {"image": first}, ["z0"])[0]
    eps = reference.run(NOISE, {"z0": z0}, ["eps"])[0]
    t = np.linspace(10, num_train_timesteps - 10, len(z0)).round().astype(np.float32)  # mixed timesteps
    text = None if ids is None else reference.run(TEXT_ENCODER, {"input_ids": ids}, ["last_hidden_state"])[0]
    batches = [reference.run(CLASSIFIER, {"image": images[i:i + step]}, ["errors"])[0]
               for i in range(0, len(images), step)]
    outs = [f"errors_{x}" for x in losses]
    scored = reference.run(SCORER, {"z0": z0, "eps": eps, "timestep": t, "class_embeddings": emb}, outs)
    return Reference(images, what, step, z0, eps, t, ids, text, batches, dict(zip(outs, scored, strict=True)))


def validate_bundle(bundle_dir: Path, ref: Reference, precision: str, tolerance: float,
                    min_agreement: float, log: Any = None) -> dict[str, Any]:
    """Every graph on onnxruntime (CPU) vs the fp32 torch modules it was exported from (their outputs in `ref`), on
    real inputs, at the bundle's batch sizes; top-1 agreement of the classifier graph with the torch classifier on
    `ref.images`; and the classifier graph vs the same NoOp pass through the encoder, noise and scorer graphs. One
    session at a time, each released before the next opens (`validation_runner`: weights read memory-mapped)."""
    bundle = Bundle.open(bundle_dir, verify="none")
    m = bundle.manifest
    ort = validation_runner(bundle)
    emb = bundle.class_embeddings()

    def done(graph: str) -> None:  # each session is released before the next opens; the log marks each step
        ort.release(graph)
        if log is not None:
            print(f"  validated {graph} on onnxruntime", file=log)

    step, images = ref.step, ref.images
    loss = str(m["loss"])
    graphs: dict[str, dict[str, float]] = {}
    graphs[ENCODER] = _rel_error(ort.run(ENCODER, {"image": images[:step]}, ["z0"])[0], ref.z0)
    zs = [ort.run(ENCODER, {"image": images[i:i + step]}, ["z0"])[0] for i in range(0, len(images), step)]
    done(ENCODER)
    graphs[NOISE] = _rel_error(ort.run(NOISE, {"z0": ref.z0}, ["eps"])[0], ref.eps)
    noises = [ort.run(NOISE, {"z0": z}, ["eps"])[0] for z in zs]
    done(NOISE)
    if ref.ids is not None and ref.text is not None:
        graphs[TEXT_ENCODER] = _rel_error(ort.run(TEXT_ENCODER, {"input_ids": ref.ids}, ["last_hidden_state"])[0],
                                          ref.text)
        done(TEXT_ENCODER)
    # one UNet-holding session at a time (classifier, then scorer)
    same, gaps, got_errors = [], [], []
    for i, want in zip(range(0, len(images), step), ref.classifier, strict=True):
        got, probs = ort.run(CLASSIFIER, {"image": images[i:i + step]}, ["errors", "probs"])
        same.append(want.argmin(axis=1) == got.argmin(axis=1))
        gaps.append(float(np.abs(want - got).max()))
        got_errors.append(got)
        if i == 0:
            graphs[CLASSIFIER] = _rel_error(got, want)
            graphs[CLASSIFIER]["probs_sum_max_dev"] = float(np.abs(probs.sum(axis=1) - 1).max())
    done(CLASSIFIER)
    outs = list(ref.scorer)
    feeds = {"z0": ref.z0, "eps": ref.eps, "timestep": ref.timesteps, "class_embeddings": emb}
    for name, got in zip(outs, ort.run(SCORER, feeds, outs), strict=True):
        graphs[f"{SCORER}:{name}"] = _rel_error(got, ref.scorer[name])
    path_gaps = []
    for z, e, got in zip(zs, noises, got_errors, strict=True):
        via = ort.run(SCORER, {"z0": z, "eps": e, "timestep": np.full(len(z), float(m["t_star"]), np.float32),
                               "class_embeddings": emb}, [f"errors_{loss}"])[0]
        path_gaps.append(float(np.abs(via - got).max()))
    done(SCORER)
    ort.close()
    openvino = _openvino_agreement(bundle, ref, min_agreement) if precision == "int8" else None
    agree = float(np.concatenate(same).mean())
    for name, g in graphs.items():
        g["passed"] = g["max_rel"] <= tolerance or (precision == "int8" and name == CLASSIFIER)
    report = {
        "precision": precision, "runtime": "onnxruntime " + _ort_version() + " CPUExecutionProvider",
        "reference": "PyTorch fp32 " + torch.__version__, "images": ref.what, "tolerance_max_rel": tolerance,
        "graphs": graphs,
        "classifier": {"top1_agreement": agree, "min_agreement": min_agreement, "max_error_gap": max(gaps),
                       "classifier_vs_scorer_path_max_gap": max(path_gaps), "passed": agree >= min_agreement},
    }
    if openvino is not None:
        report["classifier_openvino"] = openvino
    report["passed"] = (all(g["passed"] for g in graphs.values()) and report["classifier"]["passed"]
                        and (openvino or {}).get("passed", True))
    return report


def _openvino_agreement(bundle: Bundle, ref: Reference, min_agreement: float) -> dict[str, Any]:
    """The INT8 classifier graph on OpenVINO's CPU plugin (its int8 kernels; the rest in OpenVINO's default
    precision): top-1 agreement with the fp32 torch classifier on the same images, gated like onnxruntime's. Where
    OpenVINO is not installed the check is recorded as not run (it does not block an onnxruntime export)."""
    from noop_rt.runtime.backends.base import installed

    if not installed("openvino"):
        return {"ran": False, "why": "openvino is not installed", "passed": True}
    from noop_rt.runtime.backends.openvino_runner import OpenVinoRunner

    runner = OpenVinoRunner(bundle)
    try:
        same = []
        for i, want in zip(range(0, len(ref.images), ref.step), ref.classifier, strict=True):
            got = runner.run(CLASSIFIER, {"image": ref.images[i:i + ref.step]}, ["errors"])[0]
            same.append(want.argmin(axis=1) == got.argmin(axis=1))
    except RuntimeError as exc:  # OpenVINO cannot compile or run the graph: the gate fails, saying why
        return {"ran": False, "why": str(exc).strip().splitlines()[-1], "passed": False}
    finally:
        runner.close()
    import openvino

    agree = float(np.concatenate(same).mean())
    return {"ran": True, "runtime": f"OpenVINO {openvino.__version__} CPU", "runs_in": runner.execution_precision,
            "top1_agreement": agree, "min_agreement": min_agreement, "passed": agree >= min_agreement}


def validation_runner(bundle: Bundle) -> Any:
    """onnxruntime on the CPU for validation, its weights used in place from the memory-mapped weights.bin (no
    prepacked heap copies: `WEIGHT_MODES["mapped"]`)."""
    from noop_rt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

    return OnnxRuntimeRunner(bundle, "cpu", weights="mapped")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def print_validation(report: dict[str, Any], stream: Any = sys.stderr) -> None:
    for name, g in report["graphs"].items():
        mark = "✓" if g["passed"] else "✗"
        print(f"  {mark} {name:<20} max abs {g['max_abs']:.2e}  max rel {g['max_rel']:.2e} "
              f"(tolerance {report['tolerance_max_rel']:.0e})", file=stream)
    c = report["classifier"]
    mark = "✓" if c["passed"] else "✗"
    print(f"  {mark} classifier top-1 agreement {100 * c['top1_agreement']:.1f} % on {report['images']} "
          f"(required {100 * c['min_agreement']:.1f} %), max error gap {c['max_error_gap']:.2e}", file=stream)
    v = report.get("classifier_openvino")
    if v is not None and v["ran"]:
        print(f"  {'✓' if v['passed'] else '✗'} classifier on OpenVINO CPU ({v['runs_in']}): top-1 agreement "
              f"{100 * v['top1_agreement']:.1f} % (required {100 * v['min_agreement']:.1f} %)", file=stream)
    elif v is not None:
        print(f"  {'-' if v['passed'] else '✗'} classifier on OpenVINO CPU not run: {v['why']}", file=stream)


def export_bundle(ckpt_path: str | Path, out: str | Path, options: ExportOptions | None = None,
                  log: Any = sys.stderr) -> ExportReport:
    """Export, validate, publish. Raises ValidationFailedError (exit 3) when parity fails; nothing is published."""
    options = options or ExportOptions()
    if options.precision not in TOLERANCE:
        raise BadInputError(f"unknown precision {options.precision!r} (fp32, fp16 or int8)")
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

    backbone = checkpoint_backbone(ckpt, ckpt_path, lora=options.lora)  # its LoRA fused: the graphs carry it
    _drop_vae_decoder(backbone)
    emb = ckpt.class_embeddings.float().numpy()
    c, max_tokens, text_dim = emb.shape
    specs = {g: s for g, s in backbone_specs(backbone).items() if g != TEXT_ENCODER or options.text_encoder}
    half = options.precision == "fp16"
    images, what = _validation_images(options, ckpt, backbone.resolution)
    tolerance = options.tolerance if options.tolerance is not None else TOLERANCE[options.precision]
    min_agreement = options.min_agreement if options.min_agreement is not None else AGREEMENT[options.precision]
    name = model_name(ckpt_path)
    command = (f"noop-rt export --ckpt {ckpt_path} --out {out} --opset {options.opset} --{options.precision}"
               + ("" if options.text_encoder else " --no-text-encoder"))
    print(f"exporting {ckpt_path} -> {out} ({options.precision}, opset {options.opset}); equivalent: {command}",
          file=log)
    with _staging(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        ids = None
        tokenizers: list[dict[str, Any]] = []
        if options.text_encoder:
            from noop_rt.runtime.tokenizer import PromptTokenizer

            tokenizers = save_tokenizers(backbone, tmp)
            ids = np.concatenate([PromptTokenizer(tmp / t["folder"], t["max_tokens"])(list(ckpt.prompts))
                                  for t in tokenizers], axis=1)
        # 1. the fp32 torch outputs that validation compares with, while the fp32 modules are there
        t0 = time.perf_counter()
        reference = TorchRunner(backbone, ckpt)  # fp32 modules over the backbone's own networks (no copy)
        ref = reference_outputs(reference, images, what, options.images_per_batch, ids, emb,
                                backbone.num_train_timesteps)
        reference.close()
        del reference
        unet_gflop = _unet_gflop(backbone)
        print(f"  PyTorch fp32 reference outputs in {time.perf_counter() - t0:.1f} s", file=log)
        # 2. graph by graph, each graph's weights streamed into weights.bin (fp16: the UNet halved in place first)
        modules = graph_modules(backbone, ckpt, half=half, copy=False)
        facts = {  # what the manifest needs of the backbone, which is freed before validation
                 "kind": backbone.kind, "family": backbone.family, "prediction_type": backbone.prediction_type,
                 "family_fields": family_fields(backbone, ckpt.t_star),
                          "lora": None if backbone.lora is None else {**backbone.lora, "fused": True},
                          "resolution": backbone.resolution, "latent_shape": list(backbone.latent_shape),
                          "num_train_timesteps": backbone.num_train_timesteps,
                          "abar_t_star": float(backbone.alphas_cumprod[ckpt.t_star])}
        weights_file = WeightsFile(tmp)
        int8 = None
        for graph in (g for g in GRAPH_NAMES if g in specs):
            t0 = time.perf_counter()
            spec = specs[graph]
            int8_graph = graph == CLASSIFIER and options.precision == "int8"  # the quantizer needs it whole
            path = export_graph(modules.pop(graph), spec, work, options.opset,
                                None if int8_graph else weights_file)
            model = onnx_load(path, external=False)
            note = ""
            if int8_graph:
                from noop_rt.build.quantize import checkpoint_images, quantize_classifier

                calibration, int8 = checkpoint_images(ckpt, backbone.resolution, ("fewshot",),
                                                      list(options.calibrate_images))
                model = quantize_classifier(onnx_load(path, external=True), calibration, emb, work)
                note = f", quantized to INT8 on {int8}"
            if graph == CLASSIFIER:
                bake_input(model, "class_embeddings", emb)
                if int8_graph:  # Q/DQ pairs left on what baking made constant: OpenVINO cannot compile them
                    from noop_rt.build.quantize import strip_constant_qdq

                    strip_constant_qdq(model)
                set_labels(model, ckpt.classes, ckpt.prompts)
            weights_file.save(weights_file.add(model, path.parent), spec.file)
            del model
            shutil.rmtree(path.parent)
            print(f"  exported {spec.file} in {time.perf_counter() - t0:.1f} s{note}", file=log)
        weights = weights_file.close(list(specs))
        # 3. the torch side is done: free it before any onnxruntime session opens
        del modules
        del backbone  # its networks are freed with it
        release_memory()
        shutil.rmtree(work)
        print(f"  weights stored once: {weights['bytes'] / 1e6:.1f} MB in {weights['file']} "
              f"({weights['referenced_tensor_bytes'] / 1e6:.1f} MB referenced by {len(specs)} graphs)", file=log)
        np.save(tmp / "class_embeddings.npy", emb)
        files = [*(s.file for s in specs.values()), weights["file"], "class_embeddings.npy",
                 *sorted(f"{t['folder']}/{p.name}" for t in tokenizers for p in (tmp / t["folder"]).iterdir())]
        classifier = specs[CLASSIFIER]
        manifest = {
            "format": FORMAT, "version": VERSION, "name": name, "cache_key": key, "noop_rt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_ckpt": {"path": str(ckpt_path), "sha256": ckpt_sha},
            "backbone": {"source": ckpt.backbone_source, "kind": facts["kind"], "family": facts["family"],
                         "prediction_type": facts["prediction_type"], **facts["family_fields"],
                         "lora": facts["lora"]},
            "classes": ckpt.classes, "prompts": ckpt.prompts, "template": ckpt.template,
            "prompt_tuned": ckpt.prompt_ctx is not None, "t_star": ckpt.t_star,
            "text_encoder": options.text_encoder,  # False: new class names or prompts cannot be embedded
            "abar_t_star": facts["abar_t_star"], "loss": ckpt.loss, "tau": ckpt.tau,
            "resolution": facts["resolution"], "latent_shape": facts["latent_shape"],
            "max_tokens": max_tokens, "text_dim": text_dim, "num_train_timesteps": facts["num_train_timesteps"],
            "tokenizers": tokenizers,
            "unet_gflop_per_sample": unet_gflop, "precision": options.precision, "opset": options.opset,
            "images_per_batch": options.images_per_batch, "max_batch": options.images_per_batch * c, "opt_batch": c,
            "preprocessing": default_preprocessing(facts["resolution"]),
            "classifier_graph": {"file": classifier.file, "input": "image", "errors": "errors", "probs": "probs",
                                 "note": "feed `image` alone: the trained classes' embeddings are constants of the "
                                         "graph (other class sets run through the scorer graph)"},
            "scorer_losses": list(LOSSES),
            "graphs": {g: (baked_classifier_spec(spec) if g == CLASSIFIER else spec).to_json()
                       for g, spec in specs.items()},
            "weights": weights, "drift": ckpt.train.get("drift"), "cascade": ckpt.train.get("cascade"),
            "int8": None if int8 is None else {"graph": CLASSIFIER, "calibration": int8,
                                               "quantizer": "onnxruntime quantize_static, QDQ, per-channel int8 "
                                                            "weights, uint8 activations, MinMax"},
            "build_config": {"command": command, "exporter": "torch.onnx TorchScript (dynamo=False)",
                             "torch": torch.__version__, "onnx_opset": options.opset},
            "files": {},
        }
        manifest["files"] = {f: {"sha256": sha256_file(tmp / f), "size": (tmp / f).stat().st_size} for f in files}
        write_json_atomic(tmp / MANIFEST, manifest)
        validation = validate_bundle(tmp, ref, options.precision, tolerance, min_agreement, log)
        write_json_atomic(tmp / "validation.json", validation)
        manifest["files"]["validation.json"] = {"sha256": sha256_file(tmp / "validation.json"),
                                                "size": (tmp / "validation.json").stat().st_size}
        write_json_atomic(tmp / MANIFEST, manifest)
        print("validation (onnxruntime vs PyTorch fp32):", file=log)
        print_validation(validation, log)
        if not validation["passed"]:
            raise ValidationFailedError(
                f"export validation failed (see the ✗ lines); nothing was written to {out}. Relax with "
                "--tolerance/--min-agreement if the gap is expected")
        _publish(tmp, out)
    return ExportReport(out, False, validation, time.perf_counter() - start)


def save_tokenizers(backbone: Backbone, folder: Path) -> list[dict[str, Any]]:
    """Each tokenizer of the backbone in its fast (tokenizer.json) form, in the folder its diffusers folder names
    (SD 1.x/2.x: tokenizer/; SDXL/SD3: tokenizer/, tokenizer_2/[, tokenizer_3/]); [{"folder", "max_tokens"}], the
    order in which the text encoder graph takes their ids."""
    parts = backbone.tokenizers or (("tokenizer", backbone.tokenizer, backbone.max_tokens),)
    out = []
    for name, tokenizer, length in parts:
        tokenizer.save_pretrained(folder / name)
        if not (folder / name / "tokenizer.json").is_file():
            raise BadInputError(f"the {name} of {backbone.source} has no fast (tokenizer.json) form, which the "
                                "runtime needs")
        out.append({"folder": name, "max_tokens": int(length)})
    return out


def family_fields(backbone: Backbone, t_star: int) -> dict[str, Any]:
    """What an SDXL/SD3 bundle's manifest adds about its conditioning and noise schedule."""
    out: dict[str, Any] = {}
    if backbone.family == "sdxl":
        out["time_ids"] = [float(x) for x in backbone.unet.time_ids]  # constants of the UNet-holding graphs
    if backbone.family in ("sdxl", "sd3"):
        out["pooled_dim"] = int(backbone.unet.pooled_dim)  # the class embeddings' last row holds it
    if backbone.sigmas is not None:
        out["sigma_t_star"] = float(backbone.sigmas[t_star])
        out["abar_t_star_note"] = "flow matching: abar_t_star is the DDPM abar of the same signal-to-noise ratio"
    return out


def collect_images(folder: Path) -> list[Path]:
    """Every image under `folder` (recursively), sorted."""
    if not folder.is_dir():
        raise BadInputError(f"validation image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BadInputError(f"no images under {folder}")
    return paths


def _unet_gflop(backbone: Backbone) -> float | None:
    """One UNet sample's GFLOP, recorded so that bench can quote achieved GFLOP/s without torch; None where the
    counter cannot run the model here (fp16 on a CPU without half kernels)."""
    try:
        return round(backbone.unet_gflop(), 6)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None
