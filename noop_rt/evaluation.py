"""Accuracy helpers for benchmarks: score a labelled tensor set with any strategy, in batches, with progress."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from noop_rt import scoring
from noop_rt.backbone import Backbone


def score_in_batches(fn: Callable[[torch.Tensor], scoring.Scores], z0: torch.Tensor, batch: int = 32,
                     desc: str | None = None) -> scoring.Scores:
    """Concatenate `fn(z0[i:i+batch])` over the set. (fn maps latents (B, c, h, w) -> Scores)"""
    parts = []
    with torch.no_grad():
        for i in tqdm(range(0, len(z0), batch), desc=desc, file=sys.stderr, disable=desc is None, leave=False):
            parts.append(fn(z0[i:i + batch]))
    return scoring.Scores(torch.cat([p.errors for p in parts]), torch.cat([p.pairs_scored for p in parts]),
                          torch.cat([p.unet_evals for p in parts]),
                          None if parts[0].alive is None else torch.cat([p.alive for p in parts]))


def accuracy(scores: scoring.Scores, labels: torch.Tensor) -> float:
    return float((scores.predictions() == labels).float().mean())


def single_noise(backbone: Backbone, z0: torch.Tensor, emb: torch.Tensor, t: int, seed: int, loss: str = "l2",
                 max_batch: int = 512) -> scoring.Scores:
    """ONE random (t, eps) pair shared by every image and class — the unstable classifier NoOp fixes."""
    eps = scoring.noise_bank(1, z0.shape[1:], seed)[0]

    def fn(z: torch.Tensor) -> scoring.Scores:
        return scoring.noop_scores(backbone.predict_eps, z, eps.expand_as(z), t, emb, backbone.alphas_cumprod, loss,
                                   max_batch)

    return score_in_batches(fn, z0)


def baseline(backbone: Backbone, z0: torch.Tensor, emb: torch.Tensor, n: int, seed: int = 0, loss: str = "l2",
             max_batch: int = 512, desc: str | None = None) -> scoring.Scores:
    def fn(z: torch.Tensor) -> scoring.Scores:
        return scoring.baseline_scores(backbone.predict_eps, z, emb, backbone.alphas_cumprod, n, seed, loss,
                                       max_batch)

    return score_in_batches(fn, z0, batch=max(1, 2048 // max(1, n * emb.shape[0])) or 1, desc=desc)


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def demo_test_set() -> tuple[Backbone, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demo backbone, the latents z0 of the 360 held-out digits, their labels (digit values) and the plain
    class-prompt embeddings in digit order (row k = digit k)."""
    from noop_rt.backbone import load_backbone
    from noop_rt.configs import DEMO_TEMPLATE, DIGIT_NAMES
    from noop_rt.demo.digits import split_tensors

    backbone = load_backbone("demo")
    x, y = split_tensors("test")
    with torch.no_grad():
        z0 = backbone.encode(x)
    return backbone, z0, y, backbone.embed([DEMO_TEMPLATE.format(c) for c in DIGIT_NAMES])
