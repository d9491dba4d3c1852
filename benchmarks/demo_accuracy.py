"""Held-out accuracy of the built-in demo backbone with the diffusion-classifier baseline.

    python benchmarks/demo_accuracy.py            # writes benchmarks/results/demo_accuracy.{md,json}

Reports the `baseline` strategy with N = 1, 10, 100 (t evenly spaced, eps ~ N(0, I), noise seed 0) and the accuracy of
ONE random noise at t in {100, 300, 500, 700} as mean +- std over 5 noise seeds: the noise instability NoOp removes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from noop_rt.configs import DIGIT_NAMES
from noop_rt.evaluation import accuracy, baseline, demo_test_set, mean_std, single_noise

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    start = time.time()
    backbone, z0, y, emb = demo_test_set()
    result: dict = {"split": "test (360 held-out digits)", "classes": len(DIGIT_NAMES), "baseline": {},
                    "single_noise": {}}
    for n in (1, 10, 100):
        scores = baseline(backbone, z0, emb, n, desc=f"baseline N={n}")
        result["baseline"][n] = {"accuracy": accuracy(scores, y), "unet_evals_per_image": n * len(DIGIT_NAMES)}
        print(f"baseline N={n}: {result['baseline'][n]['accuracy']:.4f}", flush=True)
    for t in (100, 300, 500, 700):
        accs = [accuracy(single_noise(backbone, z0, emb, t, seed), y) for seed in range(5)]
        m, s = mean_std(accs)
        result["single_noise"][t] = {"mean": m, "std": s, "min": min(accs), "max": max(accs), "seeds": accs}
        print(f"single noise t={t}: {m:.4f} +- {s:.4f}", flush=True)
    result["minutes"] = round((time.time() - start) / 60, 1)
    result["torch_threads"] = torch.get_num_threads()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Demo backbone: held-out accuracy (360 test digits, 10 classes)", "",
             "Produced by `python benchmarks/demo_accuracy.py` on the CI-class machine (2 CPU cores).", "",
             "| strategy | UNet evals / image | accuracy |", "|---|---|---|"]
    for n, r in result["baseline"].items():
        lines.append(f"| baseline, N = {n} (t evenly spaced, seed 0) | {r['unet_evals_per_image']} | "
                     f"{100 * r['accuracy']:.1f} % |")
    for t, r in result["single_noise"].items():
        lines.append(f"| one random noise at t = {t} (5 seeds) | 10 | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} % "
                     f"(min {100 * r['min']:.1f}, max {100 * r['max']:.1f}) |")
    lines += ["", f"Wall time: {result['minutes']} min."]
    (RESULTS / "demo_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
