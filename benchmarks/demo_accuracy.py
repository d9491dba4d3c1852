"""Held-out accuracy of the built-in demo backbone with the diffusion-classifier baseline.

    python benchmarks/demo_accuracy.py [--images N] [--quick] [--out DIR]   # writes DIR/demo_accuracy.{md,json}

Reports the `baseline` strategy with N = 1, 10, 100 (t evenly spaced, eps ~ N(0, I), noise seed 0) and the accuracy of
ONE random noise at t in {100, 300, 500, 700} as mean +- std over 5 noise seeds: the noise instability NoOp removes.
Noises come from `noop_rt.runtime.strategies.noise_bank` (numpy PCG64). `--quick` (20 images, N = 1 and 2, t = 500, 2
seeds) only
proves the script runs end to end. DIR defaults to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from noop_rt.jobs.accuracy import (
    accuracy,
    command_line,
    demo_backbone,
    demo_test_set,
    mean_std,
    model_protocol,
    protocol_lines,
    score_set,
    single_noise,
    single_noise_protocol,
    strategy_protocol,
    targets,
)

RESULTS = Path(__file__).resolve().parent / "results"
LOSS = "l2"  # the diffusion-classifier default


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=None, help="first N held-out digits (default: all 360)")
    parser.add_argument("--pairs", type=ints, default=[1, 10, 100], help="baseline pair counts, e.g. 1,10,100")
    parser.add_argument("--timesteps", type=ints, default=[100, 300, 500, 700], help="single-noise timesteps")
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds per single-noise timestep")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, N = 1,2, t = 500, 2 seeds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images, args.pairs, args.timesteps, args.seeds = args.images or 20, [1, 2], [500], 2
    start = time.time()
    data = demo_test_set(args.images)
    clf = demo_backbone()
    y = targets(clf, data.names)
    c = len(clf.classes)
    protocol = {"data": data.record(), "models": {"backbone": model_protocol(clf, len(data))}, "runs": {}}
    result: dict = {"split": f"test ({len(data)} held-out digits)", "classes": c, "baseline": {},
                    "single_noise": {}}
    for n in args.pairs:
        scores = score_set(clf, data.images, "baseline", desc=f"baseline N={n}", pairs=n, seed=0, loss=LOSS)
        result["baseline"][n] = {"accuracy": accuracy(scores, y), "unet_evals_per_image": n * c}
        protocol["runs"][f"baseline N={n}"] = {"model": "backbone",
                                               **strategy_protocol(clf, "baseline", pairs=n, seed=0, loss=LOSS)}
        print(f"baseline N={n}: {result['baseline'][n]['accuracy']:.4f}", flush=True)
    z0 = clf.model.encode(data.images)
    for t in args.timesteps:
        accs = [accuracy(single_noise(clf, z0, t, seed, LOSS), y) for seed in range(args.seeds)]
        m, s = mean_std(accs)
        result["single_noise"][t] = {"mean": m, "std": s, "min": min(accs), "max": max(accs), "seeds": accs}
        protocol["runs"][f"one random noise t={t}"] = {"model": "backbone",
                                                       **single_noise_protocol(clf, t, range(args.seeds), LOSS)}
        print(f"single noise t={t}: {m:.4f} +- {s:.4f}", flush=True)
    result["minutes"] = round((time.time() - start) / 60, 1)
    import torch

    result["torch_threads"] = torch.get_num_threads()
    result["protocol"] = protocol
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Demo backbone: held-out accuracy ({len(data)} test digits, {c} classes)", "",
             f"Produced by `{command_line('demo_accuracy.py')}` on the CI-class machine (2 CPU cores).", "",
             "| strategy | UNet evals / image | accuracy |", "|---|---|---|"]
    for n, r in result["baseline"].items():
        lines.append(f"| baseline, N = {n} (t evenly spaced, seed 0) | {r['unet_evals_per_image']} | "
                     f"{100 * r['accuracy']:.1f} % |")
    for t, r in result["single_noise"].items():
        lines.append(f"| one random noise at t = {t} ({args.seeds} seeds) | {c} | {100 * r['mean']:.1f} ± "
                     f"{100 * r['std']:.1f} % (min {100 * r['min']:.1f}, max {100 * r['max']:.1f}) |")
    lines += ["", f"Wall time: {result['minutes']} min."]
    lines += protocol_lines(protocol)
    (args.out / "demo_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
