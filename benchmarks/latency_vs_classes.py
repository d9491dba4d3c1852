"""Per-image latency of the NoOp path vs the number of classes (1 -> 100), torch and onnxruntime, on the demo.

    python benchmarks/latency_vs_classes.py [--counts 1,2,...] [--runs 20] [--quick] [--out DIR]
    # writes DIR/latency_vs_classes.{md,json,png} (DIR defaults to benchmarks/results)

torch runs the demo checkpoint, onnxruntime (CPU) the demo bundle. Class lists beyond the demo's ten digits are
embedded through the text encoder ("class 17", ...): the latency of one batched UNet call over C classes does not
depend on what the prompts say. The max UNet batch is raised to C so that each image is one call. `--quick`
(1 and 2 classes, 3 timed calls) only proves the script runs end to end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import noop_rt
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, EXAMPLES_DIR
from noop_rt.jobs.accuracy import command_line, model_protocol, protocol_lines, strategy_protocol
from noop_rt.jobs.bench import _percentile, machine_info, time_single
from noop_rt.runtime.images import load_image

RESULTS = Path(__file__).resolve().parent / "results"
COUNTS = (1, 2, 5, 10, 20, 50, 100)
WARMUP = 2
BACKENDS = {"torch": CKPT_PATH, "onnxruntime": BUNDLE_DIR}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=ints, default=list(COUNTS), help="class counts, e.g. 1,2,5")
    parser.add_argument("--runs", type=int, default=20, help="timed one-image calls per point")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 classes, 3 timed calls")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.runs = [1, 2], 3
    start = time.time()
    paths = sorted(EXAMPLES_DIR.glob("*.png"))
    images = np.stack([load_image(p, 16) for p in paths])
    rows = []
    protocol: dict[str, Any] = {
        "data": {"set": f"the demo's {len(paths)} example PNGs (noop_rt/demo/examples), cycled", "images": len(paths)},
        "classes": "'class 0' ... 'class C-1' through the model's template (zero-shot prompts, embedded by the text "
                   "encoder; models below are recorded at the largest C)",
        "timing": f"noop_rt.jobs.bench.time_single: {WARMUP} untimed one-image Classifier.classify calls (top_k 1), "
                  f"then "
                  f"{args.runs} timed ones; p50/p95 of their wall time; max UNet batch raised to C (one call per "
                  "image)",
        "models": {}, "runs": {}}
    for backend, source in BACKENDS.items():
        for c in args.counts:
            classes = [f"class {i}" for i in range(c)]
            clf = noop_rt.load(source, backend=backend, device="cpu", classes=classes, method="noop",
                               max_batch=max(256, c))  # one UNet call per image
            times, evals = time_single(clf, images, args.runs, WARMUP, "noop")
            rows.append({"backend": backend, "classes": c, "p50_ms": 1e3 * _percentile(times, 0.5),
                         "p95_ms": 1e3 * _percentile(times, 0.95), "unet_evals_per_image": evals})
            protocol["models"][backend] = model_protocol(clf, args.runs)
            protocol["runs"][backend] = {"model": backend, **strategy_protocol(clf, "noop"),
                                         "max_batch": clf.model.info.max_batch}
            clf.close()
            print(rows[-1], flush=True)
    out = {"machine": machine_info(), "rows": rows, "minutes": round((time.time() - start) / 60, 1),
           "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency_vs_classes.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# NoOp latency vs number of classes (demo, one image per call)", "",
             f"Produced by `{command_line('latency_vs_classes.py')}` on {out['machine']['cpu']} "
             f"({out['machine']['cpu_count']} cores), torch {out['machine']['torch']}, onnxruntime "
             f"{out['machine']['onnxruntime']}.", "",
             "| classes | torch p50 ms | onnxruntime p50 ms |", "|---|---|---|"]
    for c in args.counts:
        t = next(r for r in rows if r["backend"] == "torch" and r["classes"] == c)
        o = next(r for r in rows if r["backend"] == "onnxruntime" and r["classes"] == c)
        lines.append(f"| {c} | {t['p50_ms']:.1f} | {o['p50_ms']:.1f} |")
    lines += protocol_lines(protocol)
    (args.out / "latency_vs_classes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in BACKENDS:
        pts = [r for r in rows if r["backend"] == backend]
        ax.plot([r["classes"] for r in pts], [r["p50_ms"] for r in pts], "o-", label=backend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes (one batched UNet call)")
    ax.set_ylabel("p50 latency per image (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "latency_vs_classes.png", dpi=120)


if __name__ == "__main__":
    main()
