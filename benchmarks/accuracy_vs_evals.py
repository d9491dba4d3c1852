"""Accuracy vs UNet evaluations per image on the demo's held-out digits: baseline N = 1…100, adaptive, pruned, NoOp.

    python benchmarks/accuracy_vs_evals.py [--noop-only] [--images N] [--quick] [--out DIR]
    # writes DIR/accuracy_vs_evals.{md,json,png} (DIR defaults to benchmarks/results)

`--noop-only` re-scores only the NoOp point (after a new `digits.pt`) and keeps the backbone-only points (baseline,
adaptive, pruned: they do not depend on the checkpoint) from the previous json, provided it was run with the same
protocol (data, backbone, strategies).

Baseline points already measured by `demo_accuracy.py` (N = 1, 10, 100) are read from its JSON rather than
recomputed when its recorded protocol (data, backbone fingerprint, strategy settings, noise) is the one this run
would use. `--quick` (20 images, baseline N = 1, 2, adaptive/pruned N = 10) only proves the script runs end to end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from noop_rt.jobs.accuracy import (
    accuracy,
    command_line,
    demo_backbone,
    demo_test_set,
    model_protocol,
    noop_classifier,
    protocol_lines,
    same_record,
    score_set,
    strategy_protocol,
    targets,
)

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE_N = (1, 2, 5, 10, 20, 100)
BUDGETS = (20, 50)  # adaptive (last stage) / pruned (max pairs)
LOSS = "l2"  # the diffusion-classifier default for the backbone-only points


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noop-only", action="store_true", help="keep the other points from the previous json")
    parser.add_argument("--images", type=int, default=None, help="first N held-out digits (default: all 360)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, baseline N = 1, 2, budget 10")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    baseline_n, budgets = (BASELINE_N, BUDGETS) if not args.quick else ((1, 2), (10,))
    if args.quick:
        args.images = args.images or 20
    start = time.time()
    data = demo_test_set(args.images)
    backbone = demo_backbone()
    protocol: dict[str, Any] = {"data": data.record(),
                                "models": {"backbone": model_protocol(backbone, len(data))}, "runs": {}}
    previous = args.out / "accuracy_vs_evals.json"
    if args.noop_only:
        old = json.loads(previous.read_text()) if previous.is_file() else {}
        old_protocol = old.get("protocol", {})
        if not (same_record(old_protocol.get("data"), protocol["data"])
                and same_record(old_protocol.get("models", {}).get("backbone"), protocol["models"]["backbone"])):
            raise SystemExit(f"error: --noop-only needs {previous} from a run with the same data and backbone "
                             "protocol; run without --noop-only")
        points = [p for p in old["points"] if p["method"] != "noop"]
        protocol["runs"] = {k: v for k, v in old_protocol["runs"].items() if v.get("model") != "noop"}
        start -= 60 * old["minutes"]  # the wall time stays that of producing every point
    else:
        points = backbone_points(backbone, data, baseline_n, budgets, protocol, args.out / "demo_accuracy.json")
    noop = noop_classifier()
    protocol["models"]["noop"] = model_protocol(noop, len(data))
    s = score_set(noop, data.images, "noop", chunk=64, desc="noop")
    points.append({"method": "noop", "n": 1, "evals": float(s.unet_evals.mean()),
                   "accuracy": accuracy(s, targets(noop, data.names))})
    protocol["runs"]["noop"] = {"model": "noop", **strategy_protocol(noop, "noop")}
    print(points[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"test_images": len(data), "points": points, "minutes": round((time.time() - start) / 60, 1),
           "protocol": protocol}
    (args.out / "accuracy_vs_evals.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Accuracy vs UNet evaluations per image (demo, {len(data)} held-out digits, "
             f"{len(backbone.classes)} classes)", "",
             f"Produced by `{command_line('accuracy_vs_evals.py')}`. N = (t, eps) pairs (baseline), pairs of the last "
             "stage (adaptive: N/10 pairs keep 5, then N), or the pair budget (pruned: rounds of 5, p < 0.01).", "",
             "| method | N | UNet evals / image | accuracy |", "|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['n']} | {p['evals']:.0f} | {100 * p['accuracy']:.1f} % |" for p in points]
    lines += ["", f"Wall time {out['minutes']} min. Plot: `accuracy_vs_evals.png`."]
    reused = [str(p["n"]) for p in points if p.get("measured_by") == "demo_accuracy.py"]
    if reused:
        lines += ["", f"Baseline N = {', '.join(reused)}: read from `demo_accuracy.json` (measured by "
                  "`demo_accuracy.py` with the same protocol)."]
    if args.noop_only:
        lines += ["", "The NoOp point was re-scored for the current `digits.pt` (`--noop-only`); the baseline, "
                  "adaptive and pruned points (backbone only) are from the earlier full run."]
    lines += protocol_lines(protocol)
    (args.out / "accuracy_vs_evals.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("baseline", "o-"), ("adaptive", "s--"), ("pruned", "^--"), ("noop", "*")):
        pts = [p for p in points if p["method"] == method]
        ax.plot([p["evals"] for p in pts], [100 * p["accuracy"] for p in pts], marker, label=method,
                markersize=12 if method == "noop" else 6)
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image (log)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Demo digits: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_evals.png", dpi=120)


def backbone_points(backbone: Any, data: Any, baseline_n: tuple[int, ...], budgets: tuple[int, ...],
                    protocol: dict[str, Any], demo_json: Path) -> list[dict]:
    """Baseline, adaptive and pruned points (they depend on the backbone only); their runs go into `protocol`."""
    y = targets(backbone, data.names)
    c = len(backbone.classes)
    demo = json.loads(demo_json.read_text()) if demo_json.is_file() else {}
    demo_protocol = demo.get("protocol", {})
    same_setup = (same_record(demo_protocol.get("data"), protocol["data"])
                  and same_record(demo_protocol.get("models", {}).get("backbone"), protocol["models"]["backbone"]))
    points: list[dict] = []
    for n in baseline_n:
        run = {"model": "backbone", **strategy_protocol(backbone, "baseline", pairs=n, seed=0, loss=LOSS)}
        known = demo.get("baseline", {}).get(str(n))
        if same_setup and known and same_record(demo_protocol.get("runs", {}).get(f"baseline N={n}"), run):
            point = {"method": "baseline", "n": n, "evals": float(n * c), "accuracy": known["accuracy"],
                     "measured_by": "demo_accuracy.py"}
        else:
            s = score_set(backbone, data.images, "baseline", desc=f"baseline {n}", pairs=n, seed=0, loss=LOSS)
            point = {"method": "baseline", "n": n, "evals": float(s.unet_evals.mean()), "accuracy": accuracy(s, y)}
        points.append(point)
        protocol["runs"][f"baseline N={n}"] = run
        print(points[-1], flush=True)
    for n in budgets:
        options = {"stages": ((max(1, n // 10), min(5, c)), (n, 1)), "seed": 0, "loss": LOSS}
        s = score_set(backbone, data.images, "adaptive", chunk=8, desc=f"adaptive {n}", **options)
        points.append({"method": "adaptive", "n": n, "evals": float(s.unet_evals.mean()), "accuracy": accuracy(s, y)})
        protocol["runs"][f"adaptive N={n}"] = {"model": "backbone", **strategy_protocol(backbone, "adaptive",
                                                                                         **options)}
        print(points[-1], flush=True)
        options = {"max_pairs": n, "round_size": 5, "alpha": 0.01, "seed": 0, "loss": LOSS}
        s = score_set(backbone, data.images, "pruned", chunk=8, desc=f"pruned {n}", **options)
        points.append({"method": "pruned", "n": n, "evals": float(s.unet_evals.mean()), "accuracy": accuracy(s, y)})
        protocol["runs"][f"pruned N={n}"] = {"model": "backbone", **strategy_protocol(backbone, "pruned", **options)}
        print(points[-1], flush=True)
    return points


if __name__ == "__main__":
    main()
