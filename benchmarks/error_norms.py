"""Does the error norm alone explain NoOp's gain? Random single-noise and N-noise baseline accuracy under l2 and l1.

    python benchmarks/error_norms.py [--baseline-noises 10]   # writes benchmarks/results/error_norms.{md,json}

NoOp's shipped checkpoint uses the l1 norm while the random-noise and baseline rows of `noop_accuracy.md` use l2
(the diffusion-classifier default). This table scores the SAME random noises with both norms on the 360 held-out
demo digits, so NoOp's l1 result can be compared like for like.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from noop_rt.evaluation import accuracy, baseline, demo_test_set, mean_std, single_noise

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--timesteps", default="300,500")
    parser.add_argument("--baseline-noises", type=int, default=10)
    args = parser.parse_args()
    start = time.time()
    backbone, z0, y, emb = demo_test_set()
    rows = []
    for loss in ("l2", "l1"):
        for t in [int(v) for v in args.timesteps.split(",")]:
            accs = [accuracy(single_noise(backbone, z0, emb, t, seed, loss), y) for seed in range(args.seeds)]
            m, s = mean_std(accs)
            rows.append({"classifier": f"one random noise at t = {t}", "loss": loss, "evals": emb.shape[0],
                         "mean": m, "std": s, "seeds": args.seeds})
            print(rows[-1], flush=True)
        n = args.baseline_noises
        acc = accuracy(baseline(backbone, z0, emb, n, 0, loss, desc=f"baseline {n} {loss}"), y)
        rows.append({"classifier": f"baseline, {n} (t, eps) pairs", "loss": loss, "evals": n * emb.shape[0],
                     "mean": acc, "std": 0.0, "seeds": 1})
        print(rows[-1], flush=True)
    out = {"rows": rows, "threads": torch.get_num_threads(), "minutes": round((time.time() - start) / 60, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "error_norms.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Error norm: l2 vs l1 with the same random noises (360 held-out demo digits)", "",
             "Produced by `python benchmarks/error_norms.py`. Mean ± std over noise seeds.", "",
             "| classifier | norm | UNet evals / image | accuracy |", "|---|---|---|---|"]
    for r in rows:
        spread = f" ± {100 * r['std']:.1f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['classifier']} | {r['loss']} | {r['evals']} | {100 * r['mean']:.1f}{spread} % |")
    lines += ["", f"Wall time: {out['minutes']} min on {out['threads']} threads."]
    (RESULTS / "error_norms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
