"""Does the error norm alone explain NoOp's gain? Random single-noise and N-noise baseline accuracy under l2 and l1.

    python benchmarks/error_norms.py [--baseline-noises 10] [--images N] [--quick] [--out DIR]
    # writes DIR/error_norms.{md,json} (DIR defaults to benchmarks/results)

NoOp's shipped checkpoint uses the l1 norm while the random-noise and baseline rows of `noop_accuracy.md` use l2
(the diffusion-classifier default). This table scores the SAME random noises with both norms on the 360 held-out
demo digits, so NoOp's l1 result can be compared like for like. `--quick` (20 images, 2 seeds, t = 500, 2 pairs)
only proves the script runs end to end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--timesteps", default="300,500")
    parser.add_argument("--baseline-noises", type=int, default=10)
    parser.add_argument("--images", type=int, default=None, help="first N held-out digits (default: all 360)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, 2 seeds, t = 500, 2 pairs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images, args.seeds, args.timesteps, args.baseline_noises = args.images or 20, 2, "500", 2
    start = time.time()
    data = demo_test_set(args.images)
    clf = demo_backbone()
    y = targets(clf, data.names)
    c = len(clf.classes)
    z0 = clf.model.encode(data.images)
    protocol = {"data": data.record(), "models": {"backbone": model_protocol(clf, len(data))}, "runs": {}}
    rows = []
    for loss in ("l2", "l1"):
        for t in [int(v) for v in args.timesteps.split(",")]:
            accs = [accuracy(single_noise(clf, z0, t, seed, loss), y) for seed in range(args.seeds)]
            m, s = mean_std(accs)
            rows.append({"classifier": f"one random noise at t = {t}", "loss": loss, "evals": c,
                         "mean": m, "std": s, "seeds": args.seeds})
            protocol["runs"][f"{rows[-1]['classifier']}, {loss}"] = {
                "model": "backbone", **single_noise_protocol(clf, t, range(args.seeds), loss)}
            print(rows[-1], flush=True)
        n = args.baseline_noises
        acc = accuracy(score_set(clf, data.images, "baseline", desc=f"baseline {n} {loss}", pairs=n, seed=0,
                                 loss=loss), y)
        rows.append({"classifier": f"baseline, {n} (t, eps) pairs", "loss": loss, "evals": n * c,
                     "mean": acc, "std": 0.0, "seeds": 1})
        protocol["runs"][f"{rows[-1]['classifier']}, {loss}"] = {
            "model": "backbone", **strategy_protocol(clf, "baseline", pairs=n, seed=0, loss=loss)}
        print(rows[-1], flush=True)
    out = {"rows": rows, "threads": torch.get_num_threads(), "minutes": round((time.time() - start) / 60, 1),
           "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "error_norms.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Error norm: l2 vs l1 with the same random noises ({len(data)} held-out demo digits)", "",
             f"Produced by `{command_line('error_norms.py')}`. Mean ± std over noise seeds.", "",
             "| classifier | norm | UNet evals / image | accuracy |", "|---|---|---|---|"]
    for r in rows:
        spread = f" ± {100 * r['std']:.1f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['classifier']} | {r['loss']} | {r['evals']} | {100 * r['mean']:.1f}{spread} % |")
    lines += ["", f"Wall time: {out['minutes']} min on {out['threads']} threads."]
    lines += protocol_lines(protocol)
    (args.out / "error_norms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
