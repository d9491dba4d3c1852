"""`noop-rt bench`: latency of the deployed NoOp path vs the 100-noise baseline, per backend, in one run.

Per backend: warm-up, then timed single-image classifications (p50/p95 latency; one image = one call, as an online
service sees it), batched throughput (images/s), and the baseline strategy with the same backbone. The baseline's
time may be extrapolated from a measured subset of its (t, eps) pairs (cost is linear in pairs); it is labelled so.
Achieved TFLOP/s uses the UNet's FLOP count measured once with torch's FlopCounterMode.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noop_rt.errors import BadInputError, NoopError
from noop_rt.runtime.classifier import Classifier, StrategyOptions, predict_arrays

SD15_UNET_GFLOP = 803.0  # SD-1.5 UNet, one sample at 64x64 latent (design §2b)


@dataclass
class BenchOptions:
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    baseline_noises: int = 100
    baseline_measured_pairs: int = 10  # pairs actually timed per baseline image; the rest extrapolated
    runs: int = 10  # timed images per backend
    warmup: int = 2
    device: str = "auto"
    fp16: bool = False


def machine_info() -> dict[str, Any]:
    import onnxruntime

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def unet_gflop(unet: torch.nn.Module, latent_shape: tuple[int, ...], tokens: int, dim: int) -> float:
    """FLOPs of one UNet forward at batch 1 (2 x multiply-adds), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(unet.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros((1, *latent_shape), dtype=param.dtype, device=param.device),
             torch.tensor([500.0], device=param.device),
             encoder_hidden_states=torch.zeros((1, tokens, dim), dtype=param.dtype, device=param.device))
    return counter.get_total_flops() / 1e9


def unet_gflop_from_source(source: str) -> float | None:
    """The UNet FLOP count from a backbone folder's config alone (a randomly initialised CPU copy; on the meta device
    attention is counted through its math decomposition, ~2 % off), for runs that time only bundle backends; None if
    the folder is not here."""
    from diffusers import UNet2DConditionModel

    from noop_rt.backbone import resolve_source

    try:
        root = resolve_source(source)
        config = UNet2DConditionModel.load_config(root / "unet")
        text = json.loads((root / "text_encoder" / "config.json").read_text())
        side, channels = int(config["sample_size"]), int(config["in_channels"])
        tokens, dim = int(text["max_position_embeddings"]), int(text["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError, NoopError):
        return None
    return unet_gflop(UNet2DConditionModel.from_config(config), (channels, side, side), tokens, dim)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def time_single(classifier: Classifier, images: list[torch.Tensor], options: StrategyOptions, runs: int,
                warmup: int) -> tuple[list[float], int]:
    """Per-image seconds over `runs` one-image calls (after `warmup` untimed ones), and UNet evals per image."""
    evals = 0
    for i in range(warmup):
        classifier.predict(images[i % len(images)][None], options, 1)
    seconds = []
    for i in range(runs):
        classifier.backend.synchronize()
        start = time.perf_counter()
        preds, _ = classifier.predict(images[i % len(images)][None], options, 1)
        classifier.backend.synchronize()
        seconds.append(time.perf_counter() - start)
        evals = preds[0].unet_evals
    return seconds, evals


def stats(seconds: list[float], evals: float, gflop: float | None, scale: float = 1.0) -> dict[str, Any]:
    p50 = 1e3 * _percentile(seconds, 0.5) * scale
    out = {"p50_ms": p50, "p95_ms": 1e3 * _percentile(seconds, 0.95) * scale,
           "images_per_s": 1e3 / (statistics.mean(seconds) * 1e3 * scale), "unet_evals_per_image": evals}
    if gflop:
        out["achieved_tflops"] = evals * gflop / 1e3 / (p50 / 1e3)
    return out


def bench_backend(classifier: Classifier, images: list[torch.Tensor], options: BenchOptions,
                  gflop: float | None, log: Any = sys.stderr) -> dict[str, Any]:
    """NoOp and baseline timings for one backend, measured back to back."""
    noop = StrategyOptions(method="noop")
    seconds, evals = time_single(classifier, images, noop, options.runs, options.warmup)
    noop_stats = stats(seconds, evals, gflop)
    batch = [images[i % len(images)] for i in range(max(len(images), 2 * options.runs))]
    start = time.perf_counter()
    predict_arrays(classifier, batch, noop, 1)
    classifier.backend.synchronize()
    noop_stats["batched_images_per_s"] = len(batch) / (time.perf_counter() - start)
    measured = min(options.baseline_noises, options.baseline_measured_pairs)
    base_opts = StrategyOptions(method="baseline", noises=measured)
    runs = max(2, options.runs // 3)
    seconds, evals = time_single(classifier, images, base_opts, runs, 1)
    scale = options.baseline_noises / measured
    base = stats(seconds, evals * scale, gflop, scale=scale)
    base["extrapolated"] = measured < options.baseline_noises
    base["measured_pairs"] = measured
    print(f"  {classifier.backend.name:<12} noop p50 {noop_stats['p50_ms']:.1f} ms, baseline({options.baseline_noises})"
          f" p50 {base['p50_ms']:.1f} ms{' (extrapolated)' if base['extrapolated'] else ''}", file=log)
    return {"device": classifier.backend.device, "noop": noop_stats, "baseline": base,
            "speedup_vs_baseline": base["p50_ms"] / noop_stats["p50_ms"]}


def run_bench(classifiers: dict[str, Classifier], images: list[torch.Tensor], options: BenchOptions,
              gflop: float | None, backbone_name: str, log: Any = sys.stderr) -> dict[str, Any]:
    if not classifiers:
        raise BadInputError("no backend could be benchmarked")
    first = next(iter(classifiers.values()))
    report: dict[str, Any] = {"machine": machine_info(), "backbone": backbone_name, "classes": len(first.classes),
                              "resolution": first.backend.resolution, "unet_gflop_per_sample": gflop,
                              "baseline_noises": options.baseline_noises, "runs": options.runs, "backends": {}}
    for name, classifier in classifiers.items():
        report["backends"][name] = bench_backend(classifier, images, options, gflop, log)
    if "torch" in report["backends"]:
        ref = report["backends"]["torch"]["noop"]["p50_ms"]
        report["speedup_vs_torch"] = {n: ref / b["noop"]["p50_ms"] for n, b in report["backends"].items()}
    else:
        report["speedup_vs_torch"] = {}
    return report


def format_table(report: dict[str, Any]) -> str:
    gflop = report.get("unet_gflop_per_sample")
    flops = f", {gflop:.1f} GFLOP per UNet sample (counted)" if gflop else ""
    if gflop and report.get("reference_unet_gflop"):
        flops += f" vs {report['reference_unet_gflop']:.0f} reference"
    lines = [f"{report['classes']} classes at {report['resolution']} px, backbone {report['backbone']}, "
             f"baseline = {report['baseline_noises']} noises x all classes{flops}",
             f"{'backend':<12} {'method':<9} {'p50 ms':>10} {'p95 ms':>10} {'img/s':>8} {'UNet evals':>10} "
             f"{'TFLOP/s':>8} {'speed-up':>9}"]
    for name, b in report["backends"].items():
        for method in ("noop", "baseline"):
            s = b[method]
            mark = "*" if s.get("extrapolated") else ""
            speed = f"{b['speedup_vs_baseline']:.1f}x" if method == "noop" else ""
            tflops = f"{s['achieved_tflops']:.3g}" if "achieved_tflops" in s else "-"
            lines.append(f"{name:<12} {method:<9} {s['p50_ms']:>9.1f}{mark} {s['p95_ms']:>10.1f} "
                         f"{s['images_per_s']:>8.2f} {s['unet_evals_per_image']:>10.0f} {tflops:>8} {speed:>9}")
    if any(b["baseline"].get("extrapolated") for b in report["backends"].values()):
        lines.append("* baseline extrapolated linearly from the timed pairs (cost is linear in pairs)")
    for name, x in report.get("speedup_vs_torch", {}).items():
        if name != "torch":
            lines.append(f"{name} vs torch eager (NoOp path): {x:.2f}x")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    noop = [report["backends"][n]["noop"]["p50_ms"] for n in names]
    base = [report["backends"][n]["baseline"]["p50_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], base, 0.4, label=f"baseline ({report['baseline_noises']} noises)")
    ax.bar([x + 0.2 for x in xs], noop, 0.4, label="NoOp (1 pass)")
    ax.set_xticks(list(xs), names)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency per image (ms, log)")
    ax.set_title(f"{report['classes']} classes, {report['machine'].get('gpu') or report['machine']['cpu']}"[:70],
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sd15_shape_model(folder: Path, log: Any = sys.stderr) -> Path:
    """An SD-1.5-architecture diffusers folder with random weights, cached as `folder/sd15-shape`."""
    from noop_rt.configs import SD15_SHAPE, random_components, save_components

    model_dir = folder / "sd15-shape"
    if not (model_dir / "model_index.json").is_file():
        print(f"building an SD-1.5-shape model with random weights in {model_dir} …", file=log)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder))
        save_components(random_components(SD15_SHAPE), str(tmp))
        tmp.rename(model_dir)
    return model_dir


def sd15_shape_checkpoint(folder: Path, classes: int, log: Any = sys.stderr) -> Path:
    """An SD-1.5-architecture folder with random weights (latency does not depend on them) and a random NoOp
    checkpoint for it, cached in `folder`."""
    from noop_rt.backbone import load_backbone
    from noop_rt.checkpoint import NoopCheckpoint, backbone_fingerprint, save_checkpoint
    from noop_rt.noop import MetaNet, MetaNetConfig

    model_dir = sd15_shape_model(folder, log)
    ckpt_path = folder / f"sd15-shape-{classes}.pt"
    if not ckpt_path.is_file():
        backbone = load_backbone(model_dir)
        names = [f"class {i}" for i in range(classes)]
        prompts = [f"a photo of a {n}" for n in names]
        meta = MetaNet(MetaNetConfig(4, (64, 128, 256)))
        ckpt = NoopCheckpoint(
            backbone_source=str(model_dir), backbone_fingerprint=backbone_fingerprint(backbone), classes=names,
            prompts=prompts, template="a photo of a {}", t_star=500, loss="l2",
            eps_d=torch.randn(backbone.latent_shape), meta_net_config={"in_channels": 4, "channels": [64, 128, 256]},
            meta_net_state=meta.state_dict(), class_embeddings=backbone.embed(prompts), tau=1.0,
            train={"note": "random weights for latency measurement only"})
        save_checkpoint(ckpt, ckpt_path)
    return ckpt_path


def bench_setup(wanted: list[str], backbone: str, bundle: Path | None, ckpt: Path | None, images: Path | None,
                num_classes: int, cache_dir: Path, device: str, fp16: bool,
                engines: Path | None = None) -> tuple[dict[str, Classifier], list[torch.Tensor]]:
    """The classifiers to time (one per available backend) and the images to time them on."""
    from noop_rt.bundle import Bundle
    from noop_rt.data import load_image
    from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, EXAMPLES_DIR
    from noop_rt.errors import NoopError
    from noop_rt.export import ExportOptions, collect_images, export_bundle
    from noop_rt.runtime.loader import Request, open_classifier, suggest

    for b in wanted:
        if b not in ("torch", "onnxruntime", "tensorrt"):
            raise suggest(b, ("torch", "onnxruntime", "tensorrt"), "backend")
    if backbone not in ("ckpt", "sd15-shape"):
        raise suggest(backbone, ("ckpt", "sd15-shape"), "backbone")
    ckpt_path, bundle_dir = ckpt, bundle
    if backbone == "sd15-shape":
        folder = cache_dir.expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        ckpt_path = sd15_shape_checkpoint(folder, num_classes)
        if {"onnxruntime", "tensorrt"} & set(wanted):
            bundle_dir = folder / f"bundle-{num_classes}-{'fp16' if fp16 else 'fp32'}"
            export_bundle(ckpt_path, bundle_dir, ExportOptions(precision="fp16" if fp16 else "fp32",
                                                               images_per_batch=1, min_agreement=0.0))
    elif ckpt_path is None and bundle_dir is None:
        ckpt_path, bundle_dir = CKPT_PATH, BUNDLE_DIR
    elif ckpt_path is None and bundle_dir is not None:
        source = Path(Bundle.open(bundle_dir).manifest["source_ckpt"]["path"])
        ckpt_path = source if source.is_file() else None
    classifiers = {}
    for name in wanted:
        if name == "torch":
            if ckpt_path is None:
                print("skipped torch: its checkpoint is not here (pass --ckpt)", file=sys.stderr)
                continue
            req = Request(ckpt=ckpt_path, backend="torch", device=device, fp16=fp16)
        else:
            if bundle_dir is None:
                print(f"skipped {name}: no bundle (pass --bundle)", file=sys.stderr)
                continue
            req = Request(bundle=bundle_dir, backend=name, device=device, engines=engines)
        try:
            classifiers[name] = open_classifier(req)
        except NoopError as exc:
            if name != "tensorrt":
                raise
            print(f"skipped tensorrt: {exc}", file=sys.stderr)
    if not classifiers:
        raise BadInputError("no backend could be benchmarked")
    r = next(iter(classifiers.values())).backend.resolution
    if images is not None:
        arrays = [torch.from_numpy(load_image(p, r)) for p in collect_images(images)]
    elif backbone == "ckpt" and ckpt_path is not None and Path(ckpt_path).resolve() == CKPT_PATH.resolve():

        arrays = [torch.from_numpy(load_image(p, r)) for p in sorted(EXAMPLES_DIR.glob("*.png"))]
    else:
        arrays = list(torch.rand((4, 3, r, r), generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return classifiers, arrays
