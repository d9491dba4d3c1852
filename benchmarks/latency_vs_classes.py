"""Per-image latency of the NoOp path vs the number of classes (1 -> 100), torch and onnxruntime, on the demo bundle.

    python benchmarks/latency_vs_classes.py    # writes benchmarks/results/latency_vs_classes.{md,json,png}

Class lists beyond the demo's ten digits are embedded through the bundle's text encoder graph ("class 17", ...): the
latency of one batched UNet call over C classes does not depend on what the prompts say.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from noop_rt.bench import _percentile, machine_info
from noop_rt.data import load_image
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, EXAMPLES_DIR
from noop_rt.runtime.classifier import StrategyOptions
from noop_rt.runtime.loader import Request, open_classifier

RESULTS = Path(__file__).resolve().parent / "results"
COUNTS = (1, 2, 5, 10, 20, 50, 100)


def main() -> None:
    start = time.time()
    images = [torch.from_numpy(load_image(p, 16)) for p in sorted(EXAMPLES_DIR.glob("*.png"))]
    rows = []
    for backend in ("torch", "onnxruntime"):
        for c in COUNTS:
            classes = [f"class {i}" for i in range(c)]
            req = (Request(ckpt=CKPT_PATH, backend="torch", classes=classes) if backend == "torch"
                   else Request(bundle=BUNDLE_DIR, backend="onnxruntime", classes=classes))
            clf = open_classifier(req)
            clf.max_batch = max(clf.max_batch, c)  # one UNet call per image
            opts = StrategyOptions(method="noop")
            for img in images[:2]:
                clf.predict(img[None], opts)
            times = []
            for i in range(20):
                t0 = time.perf_counter()
                clf.predict(images[i % len(images)][None], opts)
                times.append(time.perf_counter() - t0)
            rows.append({"backend": backend, "classes": c, "p50_ms": 1e3 * _percentile(times, 0.5),
                         "p95_ms": 1e3 * _percentile(times, 0.95)})
            print(rows[-1], flush=True)
    out = {"machine": machine_info(), "rows": rows, "minutes": round((time.time() - start) / 60, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency_vs_classes.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# NoOp latency vs number of classes (demo, one image per call)", "",
             f"Produced by `python benchmarks/latency_vs_classes.py` on {out['machine']['cpu']} "
             f"({out['machine']['cpu_count']} cores), torch {out['machine']['torch']}, onnxruntime "
             f"{out['machine']['onnxruntime']}.", "",
             "| classes | torch p50 ms | onnxruntime p50 ms |", "|---|---|---|"]
    for c in COUNTS:
        t = next(r for r in rows if r["backend"] == "torch" and r["classes"] == c)
        o = next(r for r in rows if r["backend"] == "onnxruntime" and r["classes"] == c)
        lines.append(f"| {c} | {t['p50_ms']:.1f} | {o['p50_ms']:.1f} |")
    (RESULTS / "latency_vs_classes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in ("torch", "onnxruntime"):
        pts = [r for r in rows if r["backend"] == backend]
        ax.plot([r["classes"] for r in pts], [r["p50_ms"] for r in pts], "o-", label=backend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes (one batched UNet call)")
    ax.set_ylabel("p50 latency per image (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "latency_vs_classes.png", dpi=120)


if __name__ == "__main__":
    main()
