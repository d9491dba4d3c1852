"""Robust mode on the demo: clean and PGD-attacked held-out accuracy of the NoOp classifier, with and without RDC
likelihood maximisation (`--robust`).

    python benchmarks/robust.py [--images 200]     # writes benchmarks/results/robust.{md,json}

Attack: L_inf PGD, white-box through the single-pass NoOp classifier (encoder, meta-net noise, UNet at t*), maximising
the margin loss err_true - min_{c != true} err_c (Carlini-Wagner style, on the errors themselves: the cross-entropy of
softmax(-tau * err) saturates at a large fitted tau and masks the gradient); eps = 8/255 of the [0, 1] range, 10 steps
of 2/255, random start.
The attack does NOT differentiate through the purification (it attacks the plain classifier; robust mode then
purifies the attacked input) — RDC also reports adaptive attacks, which this table does not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from noop_rt.backbone import load_backbone
from noop_rt.checkpoint import load_checkpoint
from noop_rt.configs import DIGIT_NAMES
from noop_rt.demo import CKPT_PATH
from noop_rt.demo.digits import split_tensors
from noop_rt.robust import RobustConfig, likelihood_maximisation
from noop_rt.scoring import noop_scores, pair_errors

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 16 / 255  # [-1, 1] units = 8/255 of the [0, 1] range
STEPS = 10
STEP = 4 / 255


def errors(backbone, noise, ckpt, x: torch.Tensor) -> torch.Tensor:
    """err_c(t*, eps_D + g(z0(x))), differentiable w.r.t. x. (B, C)"""
    z0 = backbone.encoder(x).float()
    t = torch.full((len(x), 1), ckpt.t_star, dtype=torch.long)
    return pair_errors(backbone.predict_eps, z0, t, noise(z0).unsqueeze(1), ckpt.class_embeddings,
                       backbone.alphas_cumprod, ckpt.loss)[:, 0]


def margin(err: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over images of err_true - min over the other classes: > 0 means misclassified."""
    true = err.gather(1, y[:, None])[:, 0]
    others = err.scatter(1, y[:, None], float("inf")).min(dim=1).values
    return (true - others).mean()


def pgd(backbone, noise, ckpt, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * EPS
    losses = []
    for _ in range(STEPS):
        delta.requires_grad_(True)
        loss = margin(errors(backbone, noise, ckpt, (x + delta).clamp(-1, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        losses.append(loss.item())
        with torch.no_grad():
            delta = (delta + STEP * grad.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(-1, 1) - x
    return (x + delta).detach(), losses


def accuracy(backbone, noise, ckpt, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        z0 = backbone.encode(x)
        scores = noop_scores(backbone.predict_eps, z0, noise(z0), ckpt.t_star, ckpt.class_embeddings,
                             backbone.alphas_cumprod, ckpt.loss)
    return float((scores.predictions() == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    start = time.time()
    backbone = load_backbone("demo")
    ckpt = load_checkpoint(CKPT_PATH)
    ckpt.class_embeddings = ckpt.class_embeddings[[ckpt.classes.index(n) for n in DIGIT_NAMES]]  # label k = digit k
    ckpt.classes = list(DIGIT_NAMES)
    noise = ckpt.noise_model()
    x_all, y_all = split_tensors("test")
    x_all, y_all = x_all[:args.images], y_all[:args.images]
    cfg = RobustConfig()
    counts = {"clean": 0.0, "clean + robust": 0.0, "PGD": 0.0, "PGD + robust": 0.0}
    first_last = []
    for i in range(0, len(x_all), args.batch):
        x, y = x_all[i:i + args.batch], y_all[i:i + args.batch]
        adv, losses = pgd(backbone, noise, ckpt, x, y, seed=i)
        first_last.append((losses[0], losses[-1]))
        n = len(x)
        counts["clean"] += n * accuracy(backbone, noise, ckpt, x, y)
        counts["clean + robust"] += n * accuracy(backbone, noise, ckpt, likelihood_maximisation(backbone, x, cfg), y)
        counts["PGD"] += n * accuracy(backbone, noise, ckpt, adv, y)
        counts["PGD + robust"] += n * accuracy(backbone, noise, ckpt, likelihood_maximisation(backbone, adv, cfg), y)
        print(f"{i + n}/{len(x_all)}: " + ", ".join(f"{k} {v / (i + n):.3f}" for k, v in counts.items()), flush=True)
    acc = {k: v / len(x_all) for k, v in counts.items()}
    out = {"images": len(x_all), "attack": {"type": "L_inf PGD, random start, CW margin on the errors",
                                             "eps_01": 8 / 255, "steps": STEPS,
                                            "step_01": 2 / 255, "target": "NoOp single pass (not the purifier)"},
           "robust": {"eta_01": cfg.eta / 2, "steps": cfg.steps, "step_01": cfg.step_size / 2, "pairs": cfg.pairs},
           "accuracy": acc, "attack_loss_first_last_mean": [sum(a for a, _ in first_last) / len(first_last),
                                                            sum(b for _, b in first_last) / len(first_last)],
           "minutes": round((time.time() - start) / 60, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "robust.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Robust mode on the demo ({len(x_all)} held-out digits, NoOp single pass)", "",
             "Produced by `python benchmarks/robust.py` (2 CPU cores). PGD L_inf eps = 8/255, 10 steps of 2/255, "
             "white-box through the NoOp classifier (not through the purification). Robust = RDC likelihood "
             f"maximisation, eta = 8/255, {cfg.steps} signed steps of 2/255, {cfg.pairs} (t, eps) pairs per step.", "",
             "| input | plain NoOp | NoOp + `--robust` |", "|---|---|---|",
             f"| clean | {100 * acc['clean']:.1f} % | {100 * acc['clean + robust']:.1f} % |",
             f"| PGD attacked | {100 * acc['PGD']:.1f} % | {100 * acc['PGD + robust']:.1f} % |", "",
             f"Attack margin loss (err_true - min other err, CW-style; > 0 = misclassified) rose from "
             f"{out['attack_loss_first_last_mean'][0]:.4f} (first step) to "
             f"{out['attack_loss_first_last_mean'][1]:.4f} (last step), mean over batches. "
             f"Wall time {out['minutes']} min."]
    (RESULTS / "robust.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
