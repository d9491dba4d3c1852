"""Accuracy vs UNet evaluations per image on the demo's held-out digits: baseline N = 1…100, adaptive, pruned, NoOp.

    python benchmarks/accuracy_vs_evals.py [--noop-only]   # writes benchmarks/results/accuracy_vs_evals.{md,json,png}

`--noop-only` re-scores only the NoOp point (after a new `digits.pt`) and keeps the backbone-only points (baseline,
adaptive, pruned: they do not depend on the checkpoint) from the previous json.

Baseline points already measured by `demo_accuracy.py` (N = 1, 10, 100; same noise seed and split) are read from its
JSON rather than recomputed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from noop_rt import scoring
from noop_rt.checkpoint import load_checkpoint
from noop_rt.configs import DIGIT_NAMES
from noop_rt.demo import CKPT_PATH
from noop_rt.evaluation import accuracy, baseline, demo_test_set, score_in_batches

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = RESULTS / "demo_accuracy.json"  # baseline N = 1, 10, 100 measured by demo_accuracy.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noop-only", action="store_true", help="keep the other points from the previous json")
    args = parser.parse_args()
    start = time.time()
    backbone, z0, y, emb = demo_test_set()
    ab, eps_fn = backbone.alphas_cumprod, backbone.predict_eps
    previous = RESULTS / "accuracy_vs_evals.json"
    if args.noop_only and previous.is_file():
        old = json.loads(previous.read_text())
        points = [p for p in old["points"] if p["method"] != "noop"]
        start -= 60 * old["minutes"]  # the wall time stays that of producing every point
    else:
        points = backbone_points(backbone, z0, y, emb)
    ckpt = load_checkpoint(CKPT_PATH)
    noise = ckpt.noise_model()
    ckpt_emb = ckpt.class_embeddings[[ckpt.classes.index(n) for n in DIGIT_NAMES]]  # label k = digit k
    s = score_in_batches(lambda z: scoring.noop_scores(eps_fn, z, noise(z), ckpt.t_star, ckpt_emb, ab, ckpt.loss),
                         z0, batch=64)
    points.append({"method": "noop", "n": 1, "evals": float(s.unet_evals.float().mean()), "accuracy": accuracy(s, y)})
    print(points[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"test_images": len(y), "points": points, "minutes": round((time.time() - start) / 60, 1)}
    (RESULTS / "accuracy_vs_evals.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Accuracy vs UNet evaluations per image (demo, 360 held-out digits, 10 classes)", "",
             "Produced by `python benchmarks/accuracy_vs_evals.py`. N = (t, eps) pairs (baseline), pairs of the last "
             "stage (adaptive: N/10 pairs keep 5, then N), or the pair budget (pruned: rounds of 5, p < 0.01).", "",
             "| method | N | UNet evals / image | accuracy |", "|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['n']} | {p['evals']:.0f} | {100 * p['accuracy']:.1f} % |" for p in points]
    lines += ["", f"Wall time {out['minutes']} min. Plot: `accuracy_vs_evals.png`."]
    if args.noop_only:
        lines += ["", "The NoOp point was re-scored for the current `digits.pt` (`--noop-only`); the baseline, "
                  "adaptive and pruned points (backbone only) are from the earlier full run."]
    (RESULTS / "accuracy_vs_evals.md").write_text("\n".join(lines) + "\n")
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
    fig.savefig(RESULTS / "accuracy_vs_evals.png", dpi=120)


def backbone_points(backbone, z0, y, emb) -> list[dict]:
    """Baseline, adaptive and pruned points: they depend on the backbone only."""
    ab, eps_fn = backbone.alphas_cumprod, backbone.predict_eps
    points: list[dict] = []
    known = json.loads(DEMO.read_text())["baseline"] if DEMO.is_file() else {}  # same seed, same split
    for n in (1, 2, 5, 10, 20, 100):
        if str(n) in known:
            acc = known[str(n)]["accuracy"]
        else:
            acc = accuracy(baseline(backbone, z0, emb, n, desc=f"baseline {n}"), y)
        points.append({"method": "baseline", "n": n, "evals": float(n * emb.shape[0]), "accuracy": acc})
        print(points[-1], flush=True)
    for n in (20, 50):
        s = score_in_batches(lambda z, n=n: scoring.adaptive_scores(
            eps_fn, z, emb, ab, scoring.default_adaptive_stages(n, 10)), z0, batch=8, desc=f"adaptive {n}")
        points.append({"method": "adaptive", "n": n, "evals": float(s.unet_evals.float().mean()),
                       "accuracy": accuracy(s, y)})
        print(points[-1], flush=True)
        s = score_in_batches(lambda z, n=n: scoring.pruned_scores(eps_fn, z, emb, ab, n), z0, batch=8,
                             desc=f"pruned {n}")
        points.append({"method": "pruned", "n": n, "evals": float(s.unet_evals.float().mean()),
                       "accuracy": accuracy(s, y)})
        print(points[-1], flush=True)
    return points


if __name__ == "__main__":
    main()
