"""Export parity of the demo: fp32 and fp16 ONNX bundles on onnxruntime CPU vs the fp32 PyTorch checkpoint.

    python benchmarks/export_parity.py [--images N] [--quick] [--out DIR]   # writes DIR/export_parity.{md,json}

Per graph: `noop-rt export`'s own validation (`validation.json`: max abs / relative error of onnxruntime vs PyTorch
fp32 on real inputs). Classifier: the top-1 agreement of each bundle's `classifier` graph (the whole NoOp pass,
image -> errors, on onnxruntime's CPU execution provider) with the torch checkpoint's classifier module (fp32, the
torch backend) on the 360 held-out demo digits, and the largest error gap. `--quick` (20 digits) only proves the
script runs end to end. DIR defaults to benchmarks/results.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

import noop_rt
from noop_rt.build.export import ExportOptions, export_bundle
from noop_rt.demo import CKPT_PATH
from noop_rt.jobs.accuracy import (
    command_line,
    demo_test_set,
    model_protocol,
    noop_classifier,
    protocol_lines,
    strategy_protocol,
)
from noop_rt.runtime.classifier import Classifier
from noop_rt.runtime.graph_specs import CLASSIFIER

RESULTS = Path(__file__).resolve().parent / "results"


def classifier_errors(clf: Classifier, images: np.ndarray) -> np.ndarray:
    """The `classifier` graph's errors (N, C) for the trained classes, in chunks of the model's images per call."""
    step = clf.model.images_per_call()
    return np.concatenate([clf.model.runner.run(CLASSIFIER, {"image": images[i:i + step]}, ["errors"])[0]
                           for i in range(0, len(images), step)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=None, help="first N held-out digits (default: all 360)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 digits")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images = args.images or 20
    data = demo_test_set(args.images)
    torch_clf = noop_classifier()
    reference = classifier_errors(torch_clf, data.images)  # (N, C) fp32 torch
    protocol: dict[str, Any] = {"data": data.record(), "models": {"torch": model_protocol(torch_clf, len(data))},
                                "runs": {"torch": {"model": "torch", **strategy_protocol(torch_clf, "noop")}},
                                "comparison": "argmin over classes of the `classifier` graph's errors (bundle on "
                                              "onnxruntime CPUExecutionProvider, trained classes) vs the torch "
                                              "checkpoint's classifier module (fp32), image by image"}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            start = time.perf_counter()
            report = export_bundle(CKPT_PATH, Path(tmp) / precision, ExportOptions(precision=precision),
                                   log=io.StringIO())
            seconds = round(time.perf_counter() - start, 1)
            with noop_rt.load(report.out, backend="onnxruntime", device="cpu", method="noop") as clf:
                if clf.classes != torch_clf.classes:
                    raise SystemExit(f"error: the {precision} bundle's classes differ from the checkpoint's")
                got = classifier_errors(clf, data.images)
                protocol["models"][precision] = model_protocol(clf, len(data))
                protocol["models"][precision]["model"]["location"] = (f"not kept (exported by this run from "
                                                                      f"{CKPT_PATH.name}, --{precision})")
                protocol["runs"][precision] = {"model": precision, **strategy_protocol(clf, "noop")}
            agree = float((got.argmin(axis=1) == reference.argmin(axis=1)).mean())
            measured = {"images": f"{len(data)} held-out demo digits", "top1_agreement": agree,
                        "max_error_gap": float(np.abs(got - reference).max()), "runtime": "onnxruntime "
                        f"{onnxruntime.__version__} CPUExecutionProvider", "reference": f"PyTorch fp32 "
                        f"{torch.__version__} (torch backend, checkpoint {CKPT_PATH.name})"}
            reports[precision] = {"export_validation": report.validation, "classifier_graph": measured,
                                  "export_seconds": seconds}
            print(precision, json.dumps(measured), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_parity.json").write_text(json.dumps({"machine": machine, "reports": reports,
                                                              "protocol": protocol}, indent=2) + "\n")
    lines = ["# Export parity: demo bundle on onnxruntime CPU vs PyTorch fp32", "",
             f"Produced by `{command_line('export_parity.py')}` (torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}, CPU execution provider). Per-graph values are `noop-rt export`'s own "
             "validation; the classifier rows compare each bundle's `classifier` graph with the torch checkpoint.", "",
             "| precision | graph | max abs error | max rel error |", "|---|---|---|---|"]
    for precision, rep in reports.items():
        for name, g in rep["export_validation"]["graphs"].items():
            lines.append(f"| {precision} | {name} | {g['max_abs']:.2e} | {g['max_rel']:.2e} |")
    lines += ["", "| precision | images | top-1 agreement with fp32 torch | max error gap |", "|---|---|---|---|"]
    for precision, rep in reports.items():
        c = rep["classifier_graph"]
        lines.append(f"| {precision} | {c['images']} | {100 * c['top1_agreement']:.2f} % | "
                     f"{c['max_error_gap']:.2e} |")
    lines += protocol_lines(protocol)
    (args.out / "export_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
