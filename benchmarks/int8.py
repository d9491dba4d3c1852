"""INT8 vs fp32 on the demo: `noop-rt export --int8` (the classifier graph statically quantized by onnxruntime,
calibrated on the checkpoint's few-shot digits, gated on the validation digits), then, in one run, top-1 agreement
with the fp32 bundle and accuracy on the 360 held-out digits, and NoOp p50 latency of both on onnxruntime CPU.

    python benchmarks/int8.py [--out benchmarks/results] [--runs 40]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import noop_rt
from noop_rt.build.export import ExportOptions, export_bundle
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, DIGIT_NAMES
from noop_rt.demo.digits import split_tensors
from noop_rt.jobs.bench import machine_info
from noop_rt.runtime.backends.openvino_runner import PRECISION_ENV


def p50_ms(clf: noop_rt.Classifier, x: np.ndarray, runs: int) -> float:
    for i in range(3):
        clf.classify(x[i:i + 1], top_k=1)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        clf.classify(x[i % len(x):i % len(x) + 1], top_k=1)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = export_bundle(CKPT_PATH, Path(tmp) / "digits-int8", ExportOptions(precision="int8"),
                               log=io.StringIO())
        export_s = time.perf_counter() - t0
        manifest = json.loads((Path(tmp) / "digits-int8" / "manifest.json").read_text())
        x, y = split_tensors("test")
        x, truth = x.numpy(), [DIGIT_NAMES[int(v)] for v in y]
        int8_dir = Path(tmp) / "digits-int8"
        engines = {  # name -> (bundle, backend, OpenVINO precision or None)
            "onnxruntime fp32": (BUNDLE_DIR, "onnxruntime", None),
            "onnxruntime int8": (int8_dir, "onnxruntime", None),
            "openvino fp32 bundle, default precision": (BUNDLE_DIR, "openvino", None),
            "openvino fp32 bundle, f32": (BUNDLE_DIR, "openvino", "f32"),
            "openvino int8": (int8_dir, "openvino", None)}
        clfs = {}
        for name, (bundle, backend, precision) in engines.items():
            if backend == "openvino" and precision is not None:
                os.environ[PRECISION_ENV] = precision
            try:
                clfs[name] = noop_rt.load(bundle, backend=backend)
                clfs[name].classify(x[:4], top_k=1)  # compiled while the precision is set
            finally:
                os.environ.pop(PRECISION_ENV, None)
        labels = {name: [r.label for r in clf.classify(x, top_k=1)] for name, clf in clfs.items()}
        runs_in = {name: getattr(clf.model.runner, "execution_precision", "f32") for name, clf in clfs.items()}
        timings: dict[str, list[float]] = {name: [] for name in clfs}
        for _ in range(3):  # alternate, so all see the same machine
            for name, clf in clfs.items():
                timings[name].append(p50_ms(clf, x, args.runs))
        a, b = labels["onnxruntime fp32"], labels["onnxruntime int8"]
        load_avg = os.getloadavg()
    result = {
        "machine": machine_info(), "export_seconds": round(export_s, 1),
        "validation_agreement": report.validation["classifier"]["top1_agreement"],
        "validation_images": report.validation["images"], "calibration": manifest["int8"]["calibration"],
        "held_out": {"images": len(x),
                     "agreement_with_fp32": float(np.mean([p == q for p, q in zip(a, b, strict=True)])),
                     "accuracy_fp32": float(np.mean([p == t for p, t in zip(a, truth, strict=True)])),
                     "accuracy_int8": float(np.mean([q == t for q, t in zip(b, truth, strict=True)]))},
        "engines": {name: {"runs_in": runs_in[name],
                           "agreement_with_onnxruntime_fp32": float(np.mean([p == q for p, q in
                                                                             zip(a, labels[name], strict=True)])),
                           "accuracy": float(np.mean([p == t for p, t in zip(labels[name], truth, strict=True)])),
                           "noop_p50_ms": round(statistics.median(timings[name]), 2)} for name in clfs},
        "loadavg_1m_at_end": load_avg[0],
        "openvino_gate": report.validation.get("classifier_openvino"),
        "noop_p50_ms": {"fp32": round(statistics.median(timings["onnxruntime fp32"]), 2),
                        "int8": round(statistics.median(timings["onnxruntime int8"]), 2)},
        "noop_p50_ms_rounds": timings, "runs": args.runs,
        "protocol": {"quantizer": manifest["int8"]["quantizer"], "graph": "classifier (the whole NoOp pass)",
                     "latency": f"one-image Classifier.classify, {args.runs} timed after 3 warm-up, median; three "
                                "alternating rounds, median of the rounds",
                     "backend": ("onnxruntime CPU; OpenVINO CPU (default precision: bf16 where the CPU has "
                                 "AVX512_BF16/AMX, else f32; int8 kernels for the quantized layers)")},
    }
    result["speedup_int8_vs_fp32"] = result["noop_p50_ms"]["fp32"] / result["noop_p50_ms"]["int8"]
    e = result["engines"]
    result["openvino_int8_vs_openvino_default"] = (e["openvino fp32 bundle, default precision"]["noop_p50_ms"]
                                                   / e["openvino int8"]["noop_p50_ms"])
    result["openvino_int8_vs_onnxruntime_int8"] = (e["onnxruntime int8"]["noop_p50_ms"]
                                                   / e["openvino int8"]["noop_p50_ms"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    h = result["held_out"]
    lines = ["# INT8 classifier graph vs fp32 (demo, onnxruntime and OpenVINO CPU)", "",
             f"Produced by `python benchmarks/int8.py` on {result['machine']['cpu']} ({result['machine']['cpu_count']} "
             f"cores), onnxruntime {result['machine']['onnxruntime']}; export took {result['export_seconds']} s.", "",
             "| | fp32 | int8 |", "|---|---|---|",
             f"| held-out accuracy ({h['images']} digits) | {100 * h['accuracy_fp32']:.1f} % | "
             f"{100 * h['accuracy_int8']:.1f} % |",
             f"| top-1 agreement with fp32, held-out | — | {100 * h['agreement_with_fp32']:.1f} % |",
             f"| top-1 agreement with fp32 torch, {result['validation_images']} (the export gate, >= 99 %) | — | "
             f"{100 * result['validation_agreement']:.1f} % |",
             f"| NoOp p50, one image, 10 classes | {result['noop_p50_ms']['fp32']:.1f} ms | "
             f"{result['noop_p50_ms']['int8']:.1f} ms |", "",
             f"INT8 vs fp32, measured in this run: **{result['speedup_int8_vs_fp32']:.2f}x**. Calibration: "
             f"{result['calibration']}.", "",
             "## Every engine (one run, the same 360 held-out digits; rounds alternate between engines)", "",
             f"1-min load average at the end: {result['loadavg_1m_at_end']:.1f} (2 cores; other work may share "
             "them).", "",
             "| engine | runs in | top-1 = onnxruntime fp32 (360) | accuracy | NoOp p50 |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {v['runs_in']} | {100 * v['agreement_with_onnxruntime_fp32']:.1f} % | "
              f"{100 * v['accuracy']:.1f} % | {v['noop_p50_ms']:.1f} ms |" for name, v in e.items()]
    gate = result["openvino_gate"] or {}
    lines += ["", f"OpenVINO INT8 vs OpenVINO on the fp32 bundle (default precision): "
              f"**{result['openvino_int8_vs_openvino_default']:.2f}x**; vs onnxruntime INT8: "
              f"**{result['openvino_int8_vs_onnxruntime_int8']:.2f}x**. The export gate on OpenVINO: "
              + (f"top-1 agreement with fp32 torch {100 * gate['top1_agreement']:.1f} % on the validation digits "
                 f"({gate['runs_in']})" if gate.get("ran") else f"not run ({gate.get('why')})") + ".",
              "", "## Protocol", "", "```json", json.dumps(result["protocol"], indent=2),
             "```", ""]
    (args.out / "int8.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[4:10]), file=sys.stderr)


if __name__ == "__main__":
    main()
