"""What OpenVINO computes on this CPU: the demo's fp32 bundle on onnxruntime (fp32), on OpenVINO at its own default
inference precision (bf16 on CPUs with AVX512_BF16 or AMX, else f32) and on OpenVINO held to f32, in one run:
the precision each runs in (OpenVINO's compiled runtime graph, counted by layer type and precision), NoOp p50
latency, achieved GFLOP/s against the machine's fp32 and bf16 matmul roofs, and top-1 agreement with onnxruntime
and accuracy on the 360 held-out digits.

    python benchmarks/openvino_precision.py [--out benchmarks/results] [--runs 40]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

import noop_rt
from noop_rt.demo import BUNDLE_DIR, DIGIT_NAMES
from noop_rt.demo.digits import split_tensors
from noop_rt.jobs.bench import machine_info, matmul_gflops, matmul_peak_gflops, time_single
from noop_rt.runtime.backends.openvino_runner import PRECISION_ENV


def bf16_matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float | None:
    """The best of `repeats` n x n bf16 matmuls through torch (oneDNN); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return matmul_gflops(torch.randn(n, n).to(torch.bfloat16), torch.randn(n, n).to(torch.bfloat16), repeats)


def runtime_layers(classifier: noop_rt.Classifier, image: np.ndarray) -> dict[str, int]:
    """OpenVINO's compiled classifier graph for one image: "layer type / precision" -> count, for the layers that
    carry the FLOPs (convolutions, fully connected / matmul, attention)."""
    runner = classifier.model.runner
    request = runner._request("classifier", {"image": image})
    counts: collections.Counter[str] = collections.Counter()
    for op in request.get_compiled_model().get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        if layer in ("Convolution", "FullyConnected", "MatMul", "ScaledDotProductAttention", "MHA"):
            precision = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else "?"
            counts[f"{layer} / {precision}"] += 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    x_t, y = split_tensors("test")
    x, truth = x_t.numpy(), [DIGIT_NAMES[int(v)] for v in y]
    engines: dict[str, noop_rt.Classifier] = {
        "onnxruntime": noop_rt.load(BUNDLE_DIR, backend="onnxruntime"),
        "openvino (default precision)": noop_rt.load(BUNDLE_DIR, backend="openvino"),
    }
    import os

    os.environ[PRECISION_ENV] = "f32"
    engines["openvino f32"] = noop_rt.load(BUNDLE_DIR, backend="openvino")
    del os.environ[PRECISION_ENV]
    gflop = next(iter(engines.values())).unet_gflop()
    labels = {n: [r.label for r in c.classify(x, top_k=1)] for n, c in engines.items()}
    rounds: dict[str, list[float]] = {n: [] for n in engines}
    evals = 0
    for _ in range(3):  # alternating rounds: every engine sees the same machine
        for name, clf in engines.items():
            seconds, evals = time_single(clf, x, args.runs, 3, "noop")
            rounds[name].append(1e3 * statistics.median(seconds))
    roof32, roof16 = matmul_peak_gflops(), bf16_matmul_peak_gflops()
    rows: dict[str, Any] = {}
    for name, clf in engines.items():
        p50 = statistics.median(rounds[name])
        runner = clf.model.runner
        rows[name] = {
            "executes_in": getattr(runner, "execution_precision", "f32"),
            "noop_p50_ms": round(p50, 2), "rounds_ms": [round(v, 2) for v in rounds[name]],
            "gflops": None if gflop is None else round(evals * gflop / (p50 / 1e3), 1),
            "agreement_with_onnxruntime": float(np.mean([a == b for a, b in zip(labels[name], labels["onnxruntime"],
                                                                               strict=True)])),
            "accuracy": float(np.mean([a == t for a, t in zip(labels[name], truth, strict=True)])),
            "layers": runtime_layers(clf, x[:1]) if runner.name == "openvino" else None}
    base = rows["onnxruntime"]["noop_p50_ms"]
    result = {"machine": machine_info(), "fp32_matmul_roof_gflops": round(roof32, 1),
              "bf16_matmul_roof_gflops": None if roof16 is None else round(roof16, 1),
              "unet_gflop_per_sample": gflop, "unet_evals_per_image": evals, "runs": args.runs, "engines": rows,
              "speedup_vs_onnxruntime": {n: round(base / r["noop_p50_ms"], 2) for n, r in rows.items()},
              "protocol": {"bundle": str(BUNDLE_DIR), "latency": f"one-image Classifier.classify (NoOp, 10 classes), "
                           f"{args.runs} timed after 3 warm-up, median; three alternating rounds, median of rounds",
                           "held_out": f"{len(x)} digits (noop_rt.demo.digits.split_tensors('test'))",
                           "roofs": "best of 5 2048x2048 matmuls: fp32 numpy, bf16 torch (oneDNN)"}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openvino_precision.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# What OpenVINO computes here: the demo's fp32 bundle, onnxruntime vs OpenVINO (default / f32)", "",
             f"Produced by `python benchmarks/openvino_precision.py` on {m['cpu']} ({m['cpu_count']} cores; other "
             f"work may share them, the rounds alternate), onnxruntime {m.get('onnxruntime')}. Machine roofs "
             f"measured in this run: fp32 {result['fp32_matmul_roof_gflops']} GFLOP/s, bf16 "
             f"{result['bf16_matmul_roof_gflops']} GFLOP/s. UNet: {gflop:.3f} GFLOP per sample (FlopCounterMode), "
             f"{evals} per image.", "",
             "| engine | runs in | NoOp p50 | vs onnxruntime | GFLOP/s | top-1 = onnxruntime (360) | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['executes_in']} | {r['noop_p50_ms']:.1f} ms | "
                     f"{result['speedup_vs_onnxruntime'][name]:.2f}x | {r['gflops']} | "
                     f"{100 * r['agreement_with_onnxruntime']:.1f} % | {100 * r['accuracy']:.1f} % |")
    lines += ["", "OpenVINO's compiled classifier graph (FLOP-carrying layers, `layer / runtime precision`):", ""]
    for name, r in rows.items():
        if r["layers"]:
            lines.append(f"- {name}: " + ", ".join(f"{k} x{v}" for k, v in r["layers"].items()))
    lines += ["", "## Protocol", "", "```json", json.dumps(result["protocol"], indent=2), "```", ""]
    (args.out / "openvino_precision.md").write_text("\n".join(lines))
    print("\n".join(lines[:-6]), file=sys.stderr)


if __name__ == "__main__":
    main()
