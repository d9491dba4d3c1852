"""Export parity of the demo: fp32 and fp16 ONNX bundles on onnxruntime CPU vs fp32 PyTorch.

    python benchmarks/export_parity.py     # writes benchmarks/results/export_parity.{md,json}

Both come from `noop-rt export`'s own validation (`validation.json`): per graph the max abs / relative error of
onnxruntime vs PyTorch fp32 on real inputs, and the full NoOp classifier's top-1 agreement — on the 10 demo examples
for fp32, on all 360 held-out digits for fp16.
"""

from __future__ import annotations

import io
import json
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from noop_rt.demo import CKPT_PATH
from noop_rt.export import ExportOptions, export_bundle

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            start = time.perf_counter()
            report = export_bundle(CKPT_PATH, Path(tmp) / precision, ExportOptions(precision=precision),
                                   log=io.StringIO())
            reports[precision] = {**report.validation, "export_seconds": round(time.perf_counter() - start, 1)}
            print(precision, json.dumps(report.validation["classifier"]), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_parity.json").write_text(json.dumps({"machine": machine, "reports": reports}, indent=2) + "\n")
    lines = ["# Export parity: demo bundle on onnxruntime CPU vs PyTorch fp32", "",
             f"Produced by `python benchmarks/export_parity.py` (torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}, CPU execution provider). Values are `noop-rt export`'s own validation.", "",
             "| precision | graph | max abs error | max rel error |", "|---|---|---|---|"]
    for precision, rep in reports.items():
        for name, g in rep["graphs"].items():
            lines.append(f"| {precision} | {name} | {g['max_abs']:.2e} | {g['max_rel']:.2e} |")
    lines += ["", "| precision | images | top-1 agreement with fp32 torch | max error gap |", "|---|---|---|---|"]
    for precision, rep in reports.items():
        c = rep["classifier"]
        lines.append(f"| {precision} | {rep['images']} | {100 * c['top1_agreement']:.2f} % | "
                     f"{c['max_error_gap']:.2e} |")
    (RESULTS / "export_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
