"""`noop-rt bench`: latency of the deployed NoOp path vs the N-noise baseline, per backend, in one run, and the
start-up cost of a fresh `noop-rt classify` process.

Per backend: warm-up, then timed single-image classifications (p50/p95 latency; one image = one call, as an online
service sees it), batched throughput (images/s), and the baseline strategy with the same model. The baseline's time
may be extrapolated from a measured subset of its (t, eps) pairs (cost is linear in pairs); it is labelled so.
Achieved TFLOP/s uses the UNet's FLOP count: the torch backend counts it with torch's FlopCounterMode, a bundle records
the count made at export. Start-up: N fresh processes of `python -m noop_rt classify IMAGE --json` (wall time, peak
resident memory), and one more fresh process that times import, open and the first image separately.

Bench times loaded classifiers only (`noop_rt.load`): nothing here imports torch, and the random-weight models of the
real architectures (`--backbone sd15-shape`) come from the build side (`noop_rt/build/shape_fixtures.py`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from noop_rt.jobs.startup import STARTUP_RUNS, measure_startup, startup_line
from noop_rt.runtime.backends.base import nvidia_gpus
from noop_rt.runtime.choices import ENGINES
from noop_rt.runtime.errors import BadInputError, MissingDependencyError, UsageError
from noop_rt.runtime.suggest import suggest

if TYPE_CHECKING:
    from noop_rt.runtime.classifier import Classifier

MAX_IMAGES = 64  # images kept in memory from --images
MIN_RUNS_P95 = 20  # a p95 is reported from this many timed runs up


@dataclass
class BenchOptions:
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    baseline_noises: int = 100
    baseline_measured_pairs: int = 10  # pairs actually timed per baseline image; the rest extrapolated
    runs: int = 10  # timed images per backend
    warmup: int = 2
    device: str = "auto"
    fp16: bool = False
    startup: bool = True  # also time fresh `noop-rt classify` processes
    startup_runs: int = STARTUP_RUNS


# ---------------------------------------------------------------------------------------------- machine
def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """The machine and the engine versions (read from package metadata: nothing is imported for it)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                            "torch": _version("torch"), "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
                            "openvino": _version("openvino"), "tensorrt": _version("tensorrt", "tensorrt-cu12")}
    torch_module = sys.modules.get("torch")
    if torch_module is not None:  # already loaded by the torch backend: its view of the machine
        info["torch_threads"] = torch_module.get_num_threads()
        if torch_module.cuda.is_available():
            props = torch_module.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["cuda"] = torch_module.version.cuda
    if "gpu" not in info and nvidia_gpus():
        info["gpu"] = _gpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> str:
    """The first NVIDIA GPU's model as the driver lists it (no CUDA library loaded)."""
    try:
        for folder in sorted(Path("/proc/driver/nvidia/gpus").iterdir()):
            for line in (folder / "information").read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "NVIDIA GPU"


# ---------------------------------------------------------------------------------------------- timing
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def time_single(classifier: Classifier, images: np.ndarray, runs: int, warmup: int, method: str,
                **strategy: Any) -> tuple[list[float], int]:
    """Per-image seconds over `runs` one-image calls (after `warmup` untimed ones), and UNet evals per image."""
    n = len(images)
    for i in range(warmup):
        classifier.classify(images[i % n][None], top_k=1, method=method, **strategy)
    seconds: list[float] = []
    evals = 0
    for i in range(runs):
        start = time.perf_counter()
        results = classifier.classify(images[i % n][None], top_k=1, method=method, **strategy)
        seconds.append(time.perf_counter() - start)  # classify synchronises the device before it returns
        evals = results[0].unet_evals
    return seconds, evals


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 roof to quote achieved GFLOP/s against: the best of `repeats` n x n numpy matmuls (on the
    CPU, through the BLAS numpy ships with)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return matmul_gflops(a, b, repeats)


def matmul_gflops(a: Any, b: Any, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` square matmuls `a @ b` (numpy or torch operands), after one warm-up."""
    n = a.shape[0]
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def stats(seconds: list[float], evals: float, gflop: float | None, scale: float = 1.0) -> dict[str, Any]:
    """p50/p95 (ms), sequential images/s and UNet evals per image; `scale` multiplies the times (extrapolation)."""
    p50 = 1e3 * _percentile(seconds, 0.5) * scale
    p95 = 1e3 * _percentile(seconds, 0.95) * scale if len(seconds) >= MIN_RUNS_P95 else None
    out = {"p50_ms": p50, "p95_ms": p95, "timed_runs": len(seconds),
           "images_per_s": 1e3 / (statistics.mean(seconds) * 1e3 * scale), "unet_evals_per_image": evals}
    if gflop:
        out["achieved_tflops"] = evals * gflop / 1e3 / (p50 / 1e3)
    return out


def bench_backend(classifier: Classifier, images: np.ndarray, options: BenchOptions, gflop: float | None,
                  log: IO[str] = sys.stderr) -> dict[str, Any]:
    """NoOp and baseline timings for one backend, measured back to back."""
    seconds, evals = time_single(classifier, images, options.runs, options.warmup, "noop")
    noop = stats(seconds, evals, gflop)
    batch = images[np.arange(max(len(images), 2 * options.runs)) % len(images)]
    start = time.perf_counter()
    classifier.classify(batch, top_k=1, method="noop")
    noop["batched_images_per_s"] = len(batch) / (time.perf_counter() - start)
    measured = min(options.baseline_noises, options.baseline_measured_pairs)
    runs = max(2, options.runs // 3)
    seconds, evals = time_single(classifier, images, runs, 1, "baseline", pairs=measured)
    scale = options.baseline_noises / measured
    base = stats(seconds, evals * scale, gflop, scale=scale)
    base["extrapolated"] = measured < options.baseline_noises
    base["measured_pairs"] = measured
    print(f"  {classifier.backend:<12} noop p50 {noop['p50_ms']:.1f} ms, baseline({options.baseline_noises}) p50 "
          f"{base['p50_ms']:.1f} ms{' (extrapolated)' if base['extrapolated'] else ''}", file=log)
    out = {"device": classifier.device, "precision": classifier.info.precision,
           "executes_in": classifier.model.runner.execution_precision, "noop": noop,
           "baseline": base, "speedup_vs_baseline": base["p50_ms"] / noop["p50_ms"]}
    if classifier.info.cascade:  # a fitted cascade: its cost on these images, in one batched call
        start = time.perf_counter()
        results = classifier.classify(images, top_k=1, method="cascade")
        out["cascade"] = {"images": len(results), "images_per_s": len(results) / (time.perf_counter() - start),
                          "unet_evals_per_image": statistics.mean(r.unet_evals for r in results),
                          "escalated_share": statistics.mean(bool(r.escalated) for r in results)}
    return out


def run_bench(classifiers: dict[str, Classifier], images: np.ndarray, options: BenchOptions, gflop: float | None,
              backbone_name: str, log: IO[str] = sys.stderr) -> dict[str, Any]:
    """The report (design §3 `bench --json` schema) of the opened classifiers."""
    if not classifiers:
        raise BadInputError("no backend could be benchmarked")
    first = next(iter(classifiers.values()))
    report: dict[str, Any] = {"machine": machine_info(), "backbone": backbone_name, "model": first.info.name,
                              "classes": len(first.classes), "resolution": first.resolution,
                              "unet_gflop_per_sample": gflop, "baseline_noises": options.baseline_noises,
                              "baseline_measured_pairs": min(options.baseline_noises,
                                                             options.baseline_measured_pairs),
                              "runs": options.runs, "images": len(images), "backends": {}}
    if not any(str(c.device).startswith("cuda") for c in classifiers.values()):
        report["machine"]["fp32_matmul_peak_gflops"] = matmul_peak_gflops()
    for name, classifier in classifiers.items():
        report["backends"][name] = bench_backend(classifier, images, options, gflop, log)
        peak = report["machine"].get("fp32_matmul_peak_gflops")
        for method in ("noop", "baseline"):
            s = report["backends"][name][method]
            if peak and "achieved_tflops" in s:
                s["fraction_of_fp32_matmul_peak"] = 1e3 * s["achieved_tflops"] / peak
    if "torch" in report["backends"]:
        ref = report["backends"]["torch"]["noop"]["p50_ms"]
        report["speedup_vs_torch"] = {n: ref / b["noop"]["p50_ms"] for n, b in report["backends"].items()}
    return report


# ---------------------------------------------------------------------------------------------- report
def format_table(report: dict[str, Any]) -> str:
    gflop = report.get("unet_gflop_per_sample")
    flops = f", {gflop:.1f} GFLOP per UNet sample (counted)" if gflop else ""
    if gflop and report.get("reference_unet_gflop"):
        flops += f" vs {report['reference_unet_gflop']:.0f} reference"
    lines = [f"{report['classes']} classes at {report['resolution']} px, backbone {report['backbone']}, "
             f"baseline = {report['baseline_noises']} noises x all classes{flops}",
             f"{'backend':<12} {'method':<9} {'p50 ms':>10} {'p95 ms':>10} {'img/s':>8} {'UNet evals':>10} "
             f"{'compute':>13} {'speed-up':>9}"]
    for name, b in report["backends"].items():
        for method in ("noop", "baseline"):
            s = b[method]
            mark = "*" if s.get("extrapolated") else ""
            speed = f"{b['speedup_vs_baseline']:.1f}x" if method == "noop" else ""
            rate = flop_rate(s["achieved_tflops"]) if "achieved_tflops" in s else "-"
            p95 = f"{s['p95_ms']:>10.1f}" if s.get("p95_ms") is not None else f"{'-':>10}"
            lines.append(f"{name:<12} {method:<9} {s['p50_ms']:>9.1f}{mark} {p95} "
                         f"{s['images_per_s']:>8.2f}{mark} {s['unet_evals_per_image']:>10.0f} {rate:>13} {speed:>9}")
    if any(s.get("p95_ms") is None for b in report["backends"].values() for s in (b["noop"], b["baseline"])):
        lines.append(f"p95: shown from {MIN_RUNS_P95} timed runs up (--runs)")
    if any(b["baseline"].get("extrapolated") for b in report["backends"].values()):
        lines.append(f"* baseline extrapolated linearly from {report.get('baseline_measured_pairs', '?')} timed pairs "
                     "(cost is linear in pairs)")
    for name, x in report.get("speedup_vs_torch", {}).items():
        if name != "torch":
            lines.append(f"{name} vs torch eager (NoOp path): {x:.2f}x")
    peak = report["machine"].get("fp32_matmul_peak_gflops")
    if peak:
        lines.append(f"machine fp32 roof: {peak:.0f} GFLOP/s (best 2048x2048 numpy matmul); NoOp achieves "
                     + ", ".join(f"{n} {1e3 * b['noop']['achieved_tflops']:.1f} GFLOP/s"
                                 for n, b in report["backends"].items() if "achieved_tflops" in b["noop"]))
    for name, why in report.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    if "startup" in report:
        lines.append(startup_line(report["startup"]))
    return "\n".join(lines)


def flop_rate(tflops: float) -> str:
    """Achieved FLOP/s in a unit that reads: TFLOP/s from 1 up, else GFLOP/s."""
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{1e3 * tflops:.3g} GFLOP/s"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    noop = [report["backends"][n]["noop"]["p50_ms"] for n in names]
    base = [report["backends"][n]["baseline"]["p50_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(names))
    extrapolated = any(report["backends"][n]["baseline"].get("extrapolated") for n in names)
    bars = ax.bar([x - 0.2 for x in xs], base, 0.4, hatch="//" if extrapolated else None,
                  label=f"baseline ({report['baseline_noises']} noises{', extrapolated' if extrapolated else ''})")
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    bars = ax.bar([x + 0.2 for x in xs], noop, 0.4, label="NoOp (1 pass)")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(xs), names)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency per image (ms, log)")
    ax.set_title(f"{report['classes']} classes, {report['machine'].get('gpu') or report['machine']['cpu']}"[:70],
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Sources:
    ckpt: Path | None  # for the torch backend
    bundle: Path | None  # for the bundle backends
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it cannot be benchmarked


def check_names(backends: list[str]) -> list[str]:
    """The backends to bench, in order and once each; an unknown name is a usage error with the close match."""
    if not backends:
        raise UsageError(f"no backend given; choose from {', '.join(ENGINES)}")
    for name in backends:
        if name not in ENGINES:
            raise suggest(name, ENGINES, "backend")
    return list(dict.fromkeys(backends))


def _bundle_checkpoint(bundle: Path) -> tuple[Path | None, str | None]:
    """The checkpoint a bundle was exported from, if it is still here unchanged, else (None, why)."""
    from noop_rt.demo import BUNDLE_DIR, CKPT_PATH
    from noop_rt.runtime.bundle import read_manifest, sha256_file

    record = read_manifest(bundle.expanduser()).get("source_ckpt") or {}
    if not record.get("path"):
        return None, "the bundle does not record its checkpoint (pass --ckpt)"
    path = Path(record["path"]).expanduser()
    if not path.is_file() and bundle.expanduser().resolve() == BUNDLE_DIR.resolve():
        path = CKPT_PATH  # the shipped demo records its path relative to the source tree
    if not path.is_file():
        return None, f"its checkpoint {record['path']} is not here (pass --ckpt)"
    if record.get("sha256") and sha256_file(path) != record["sha256"]:
        return None, f"{path} changed since the bundle was exported from it (pass --ckpt)"
    return path, None


def resolve_sources(backends: list[str], bundle: Path | None, ckpt: Path | None) -> Sources:
    """Which checkpoint and bundle the backends run, and which backends cannot (and why)."""
    from noop_rt.demo import BUNDLE_DIR, CKPT_PATH

    bundle_backends = [b for b in backends if b != "torch"]
    if bundle is None and ckpt is None:
        return Sources(CKPT_PATH, BUNDLE_DIR)
    sources = Sources(ckpt, bundle)
    if "torch" in backends and ckpt is None and bundle is not None:
        sources.ckpt, why = _bundle_checkpoint(bundle)
        if why is not None:
            sources.skipped["torch"] = why
    if bundle is None:
        for name in bundle_backends:
            sources.skipped[name] = "no bundle (pass --bundle)"
    return sources


def open_backends(backends: list[str], sources: Sources, device: str, fp16: bool, engines: Path | None,
                  log: IO[str] = sys.stderr) -> dict[str, Classifier]:
    """One classifier per backend that can run here; the others go to `sources.skipped` with the reason."""
    from noop_rt.api import load

    classifiers: dict[str, Classifier] = {}
    for name in backends:
        if name in sources.skipped:
            print(f"skipped {name}: {sources.skipped[name]}", file=log)
            continue
        try:
            if name == "torch":
                classifiers[name] = load(sources.ckpt, backend="torch", device=device, fp16=fp16)
            else:
                classifiers[name] = load(sources.bundle, backend=name, device=device, engines=engines)
        except MissingDependencyError as exc:  # not installed / no GPU / no engines here: not an error
            sources.skipped[name] = str(exc)
            print(f"skipped {name}: {exc}", file=log)
    if classifiers:
        first = next(iter(classifiers.values()))
        for name, classifier in classifiers.items():
            if classifier.classes != first.classes:
                for c in classifiers.values():
                    c.close()
                raise BadInputError(f"{name} runs another class set than {first.backend} ({len(classifier.classes)} "
                                    f"vs {len(first.classes)} classes): pass a bundle and the checkpoint it was "
                                    "exported from")
    return classifiers


def _image_paths(folder: Path) -> list[Path]:
    from noop_rt.runtime.images import IMAGE_SUFFIXES

    folder = folder.expanduser()
    if not folder.is_dir():
        raise BadInputError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BadInputError(f"no images under {folder}")
    return paths


def bench_images(images: Path | None, resolution: int, demo: bool) -> tuple[np.ndarray, str]:
    """Preprocessed images (N, 3, R, R) to time on, and where they came from."""
    from noop_rt.demo import EXAMPLES_DIR
    from noop_rt.runtime.images import load_image

    if images is not None:
        paths = _image_paths(images)[:MAX_IMAGES]
        return np.stack([load_image(p, resolution) for p in paths]), str(images)
    if demo:
        paths = sorted(EXAMPLES_DIR.glob("*.png"))
        return np.stack([load_image(p, resolution) for p in paths]), "demo examples"
    rng = np.random.default_rng(0)
    return rng.uniform(-1.0, 1.0, (4, 3, resolution, resolution)).astype(np.float32), "random (seed 0)"


def startup_target(sources: Sources, images: Path | None) -> tuple[Path, Path | None]:
    """The image and source a start-up run classifies: the benched bundle (or checkpoint) and image, or
    `noop-rt classify seven.png` on the built-in demo."""
    from noop_rt.demo import BUNDLE_DIR, EXAMPLES_DIR

    image = _image_paths(images)[0] if images is not None else EXAMPLES_DIR / "seven.png"
    source = sources.bundle if sources.bundle is not None else sources.ckpt
    if source is not None and sources.bundle is not None and source.resolve() == BUNDLE_DIR.resolve():
        source = None  # the demo: exactly the command a new user types
    return image, source


def bench_command(options: BenchOptions, *, bundle: Path | None = None, ckpt: Path | None = None,
                  images: Path | None = None, engines: Path | None = None, backbone: str = "ckpt",
                  reference_gflop: float | None = None, log: IO[str] = sys.stderr) -> tuple[dict[str, Any], str]:
    """`noop-rt bench`: the report (JSON-able) and its table."""
    from noop_rt.demo import CKPT_PATH

    backends = check_names(options.backends)
    if options.runs < 1 or options.baseline_noises < 1 or options.baseline_measured_pairs < 1:
        raise BadInputError("--runs, --baseline-noises and --measured-pairs must be >= 1")
    sources = resolve_sources(backends, bundle, ckpt)
    startup = None
    if options.startup:  # first, while this process holds no model and runs nothing
        image, source = startup_target(sources, images)
        print(f"start-up: {options.startup_runs} fresh `noop-rt classify {image.name}` processes …", file=log)
        startup = measure_startup(image, source, runs=options.startup_runs, device=options.device, engines=engines,
                                  log=log)
    classifiers = open_backends(backends, sources, options.device, options.fp16, engines, log)
    try:
        if not classifiers:
            detail = "; ".join(f"{k}: {v}" for k, v in sources.skipped.items())
            raise BadInputError(f"no backend could be benchmarked ({detail})")
        first = next(iter(classifiers.values()))
        demo = backbone == "ckpt" and (first.info.name == "digits" or (
            sources.ckpt is not None and sources.ckpt.resolve() == CKPT_PATH.resolve()))
        arrays, image_source = bench_images(images, first.resolution, demo)
        gflop = next((g for c in classifiers.values() if (g := c.unet_gflop()) is not None), None)
        report = run_bench(classifiers, arrays, options, gflop, backbone, log)
    finally:
        for classifier in classifiers.values():
            classifier.close()
    report["image_source"] = image_source
    if reference_gflop is not None:
        report["reference_unet_gflop"] = reference_gflop
    if sources.skipped:
        report["skipped"] = dict(sources.skipped)
    if startup is not None:
        report["startup"] = startup
    return report, format_table(report)
