"""The diffusion-classifier math, as pure functions over torch tensors with the model passed as a callable.

`eps_fn(z_t (N, c, h, w), t (N,) float, emb (N, L, D)) -> eps_hat (N, c, h, w)` is any backend (torch, onnxruntime,
TensorRT). Every strategy scores all candidate classes with the SAME (t, eps) pairs (Li et al. 2023, Clark & Jaini
2023): shared noise makes class differences low-variance. Errors are reduced in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int], None] | None
LOSSES = ("l2", "l1", "huber")
METHODS = ("noop", "baseline", "adaptive", "pruned")


def noised(z0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (DDPM forward process); abar_t (N,) or scalar."""
    abar = abar_t.reshape(-1, *([1] * (z0.dim() - 1))) if abar_t.dim() else abar_t
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def error_norm(pred: torch.Tensor, target: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Per-sample error, mean over (c, h, w): l2 = squared, l1 = absolute, huber = smooth-l1 (delta 1). (N,)"""
    pred, target = pred.float(), target.float()
    if loss == "l2":
        err = (pred - target).square()
    elif loss == "l1":
        err = (pred - target).abs()
    elif loss == "huber":
        err = F.huber_loss(pred, target, reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return err.flatten(1).mean(dim=1)


def evenly_spaced_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Li et al.'s grid: n timesteps evenly spaced over [0, T), offset by half a step (n=1 -> [500]). (n,) long"""
    n = max(1, min(n, num_train_timesteps))
    step = num_train_timesteps // n
    return torch.arange(step // 2, num_train_timesteps, step)[:n]


def noise_bank(n: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """n standard-normal noises (n, *shape), reproducible from `seed`; shared by every image and class."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def pair_errors(
    eps_fn: EpsFn, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, emb: torch.Tensor,
    alphas_cumprod: torch.Tensor, loss: str = "l2", max_batch: int = 256, progress: Progress = None,
    class_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Errors of the candidate classes for every (image, pair): (B, P, K).

    z0 (B, c, h, w); t (B, P) long; eps (B, P, c, h, w) (may be an expanded view); emb (C, L, D);
    class_idx (B, K) long: the classes scored for each image (default: all C, K = C).
    The B*P*K UNet inputs are flattened image-major and run in chunks of at most `max_batch`;
    every class of pair (b, p) sees exactly the same z_t, t and target eps.
    """
    b, p = t.shape
    if class_idx is None:
        class_idx = torch.arange(emb.shape[0]).expand(b, -1)
    class_idx = class_idx.to(emb.device)
    c = class_idx.shape[1]
    abar = alphas_cumprod.to(z0.device)[t.reshape(-1)]  # (B*P,)
    z0_rep = z0.unsqueeze(1).expand(b, p, *z0.shape[1:]).reshape(b * p, *z0.shape[1:])
    target = eps.reshape(b * p, *eps.shape[2:]).to(z0.dtype)
    z_t = noised(z0_rep, target, abar)  # (B*P, c, h, w)
    t_flat = t.reshape(-1).to(torch.float32)
    total = b * p * c
    errors = []
    for start in range(0, total, max_batch):
        idx = torch.arange(start, min(start + max_batch, total))
        pair, k = idx // c, idx % c
        cls = class_idx[(pair // p).to(emb.device), k.to(emb.device)]
        pred = eps_fn(z_t[pair], t_flat[pair], emb[cls])
        errors.append(error_norm(pred, target[pair].to(pred.device), loss))
        if progress is not None:
            progress(len(idx))
    return torch.cat(errors).reshape(b, p, c)


@dataclass
class Scores:
    """What every strategy returns, per image: mean error per class and how many pairs each class was scored on."""

    errors: torch.Tensor  # (B, C) float32 (CPU) mean error over the pairs the class was scored on
    pairs_scored: torch.Tensor  # (B, C) long
    unet_evals: torch.Tensor  # (B,) long UNet evaluations spent on each image
    alive: torch.Tensor | None = None  # (B, C) bool, classes not eliminated; None: all (baseline, noop)

    @property
    def survivors(self) -> torch.Tensor:
        """(B, C) bool: classes never eliminated (all for `baseline`/`noop`; the finalists for `adaptive`)."""
        return self.alive if self.alive is not None else torch.ones_like(self.errors, dtype=torch.bool)

    def predictions(self) -> torch.Tensor:
        """argmin of the mean error among survivors. (B,) long"""
        return self.errors.masked_fill(~self.survivors, float("inf")).argmin(dim=1)

    def probabilities(self, tau: float) -> torch.Tensor:
        """softmax(-tau * err) over the survivors; eliminated classes get 0. (B, C)"""
        return torch.softmax((-tau * self.errors).masked_fill(~self.survivors, float("-inf")), dim=1)

    def ranking(self) -> torch.Tensor:
        """Classes best first: survivors, then more pairs scored, then lower error. (B, C) long"""
        big = float(self.errors.abs().max()) + 1.0
        rounds = self.pairs_scored.float() + self.survivors.float() * (float(self.pairs_scored.max()) + 1)
        key = self.errors - rounds * big * 4  # lexicographic (survivor, pairs, error)
        return key.argsort(dim=1)


def noop_scores(
    eps_fn: EpsFn, z0: torch.Tensor, eps: torch.Tensor, t_star: int, emb: torch.Tensor,
    alphas_cumprod: torch.Tensor, loss: str = "l2", max_batch: int = 256, progress: Progress = None,
) -> Scores:
    """NoOp: ONE (t*, eps) pair per image with eps = eps_D + g_phi(x) given — exactly C UNet evaluations per image."""
    b, c = z0.shape[0], emb.shape[0]
    t = torch.full((b, 1), t_star, dtype=torch.long)
    errors = pair_errors(eps_fn, z0, t, eps.unsqueeze(1), emb, alphas_cumprod, loss, max_batch, progress)[:, 0]
    return Scores(errors.cpu(), torch.ones(b, c, dtype=torch.long), torch.full((b,), c, dtype=torch.long))


def baseline_scores(
    eps_fn: EpsFn, z0: torch.Tensor, emb: torch.Tensor, alphas_cumprod: torch.Tensor, n: int = 100,
    seed: int = 0, loss: str = "l2", max_batch: int = 256, progress: Progress = None,
) -> Scores:
    """Li et al.'s diffusion classifier: n (t, eps) pairs, t evenly spaced, eps ~ N(0, I); errors averaged."""
    b, c = z0.shape[0], emb.shape[0]
    ts = evenly_spaced_timesteps(n, alphas_cumprod.shape[0])
    n = len(ts)
    noises = noise_bank(n, z0.shape[1:], seed).to(z0.device)
    errors = pair_errors(eps_fn, z0, ts.expand(b, n), noises.expand(b, *noises.shape), emb, alphas_cumprod,
                         loss, max_batch, progress)
    return Scores(errors.mean(dim=1).cpu(), torch.full((b, c), n, dtype=torch.long),
                  torch.full((b,), n * c, dtype=torch.long))


def default_adaptive_stages(n: int, num_classes: int) -> list[tuple[int, int]]:
    """Li et al.'s two-stage schedule scaled to n pairs: (n/10 pairs, keep 5), then (n pairs, keep 1)."""
    return [(max(1, n // 10), min(5, num_classes)), (n, 1)]


def adaptive_scores(
    eps_fn: EpsFn, z0: torch.Tensor, emb: torch.Tensor, alphas_cumprod: torch.Tensor,
    stages: Sequence[tuple[int, int]], seed: int = 0, loss: str = "l2", max_batch: int = 256,
    progress: Progress = None,
) -> Scores:
    """Li et al.'s adaptive evaluation: at stage s score survivors on `pairs_s` pairs in total (nested, evenly
    spaced timesteps of one grid, each grid slot with its own fixed noise), keep the `keep_s` lowest mean errors."""
    counts = [pairs for pairs, _ in stages]
    if sorted(counts) != counts or counts[0] < 1:
        raise ValueError(f"adaptive stages need increasing pair counts >= 1, got {counts}")
    t_total = alphas_cumprod.shape[0]
    grid = evenly_spaced_timesteps(counts[-1], t_total)  # finest grid; stage s takes a strided subset
    noises = noise_bank(len(grid), z0.shape[1:], seed).to(z0.device)
    b, c = z0.shape[0], emb.shape[0]
    errors = torch.zeros(b, c)
    pairs_scored = torch.zeros(b, c, dtype=torch.long)
    evals = torch.zeros(b, dtype=torch.long)
    finalists = torch.zeros(b, c, dtype=torch.bool)
    for i in range(b):
        alive = torch.arange(c)
        sums = torch.zeros(c)
        done: set[int] = set()
        for pairs, keep in stages:
            finalists[i] = False
            finalists[i, alive] = True
            stride = max(1, len(grid) // pairs)
            slots = [s for s in range(stride // 2, len(grid), stride)[:pairs] if s not in done]
            if slots:
                slot_t = torch.tensor(slots)
                err = pair_errors(eps_fn, z0[i:i + 1], grid[slot_t].unsqueeze(0), noises[slot_t].unsqueeze(0),
                                  emb, alphas_cumprod, loss, max_batch, progress, alive.unsqueeze(0))[0]  # (P, K)
                sums[alive] += err.sum(dim=0).cpu()
                pairs_scored[i, alive] += len(slots)
                evals[i] += len(slots) * len(alive)
                done.update(slots)
            mean = sums[alive] / pairs_scored[i, alive]
            errors[i] = sums / pairs_scored[i].clamp(min=1)
            alive = alive[mean.argsort()[:max(1, min(keep, len(alive)))]]
    return Scores(errors, pairs_scored, evals, finalists)


def pruned_scores(
    eps_fn: EpsFn, z0: torch.Tensor, emb: torch.Tensor, alphas_cumprod: torch.Tensor, max_pairs: int = 100,
    round_size: int = 5, alpha: float = 0.01, seed: int = 0, loss: str = "l2", max_batch: int = 256,
    progress: Progress = None,
) -> Scores:
    """Clark & Jaini's successive elimination: add `round_size` shared pairs per round (timesteps from a seeded
    permutation of the evenly spaced grid), then drop every class whose paired t-test on per-pair error differences
    against the current best rejects "no worse" at level `alpha`; stop at one class or `max_pairs`."""
    from scipy.stats import t as student_t

    t_total = alphas_cumprod.shape[0]
    grid = evenly_spaced_timesteps(max_pairs, t_total)
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed + 1))
    noises = noise_bank(len(grid), z0.shape[1:], seed).to(z0.device)
    b, c = z0.shape[0], emb.shape[0]
    errors = torch.zeros(b, c)
    pairs_scored = torch.zeros(b, c, dtype=torch.long)
    evals = torch.zeros(b, dtype=torch.long)
    survivors = torch.zeros(b, c, dtype=torch.bool)
    for i in range(b):
        alive = torch.arange(c)
        per_pair = torch.zeros(len(grid), c)  # (P, C) errors of the pairs scored so far
        used = 0
        while used < len(grid) and len(alive) > 1:
            slots = order[used:used + round_size]
            err = pair_errors(eps_fn, z0[i:i + 1], grid[slots].unsqueeze(0), noises[slots].unsqueeze(0),
                              emb, alphas_cumprod, loss, max_batch, progress, alive.unsqueeze(0))[0]
            per_pair[used:used + len(slots), alive] = err.cpu()
            pairs_scored[i, alive] += len(slots)
            evals[i] += len(slots) * len(alive)
            used += len(slots)
            if used < 2:
                continue
            scores = per_pair[:used, alive]  # (n, K)
            best = scores.mean(dim=0).argmin()
            diff = scores - scores[:, best:best + 1]  # (n, K) >= 0 on average for worse classes
            mean, std = diff.mean(dim=0), diff.std(dim=0, unbiased=True)
            t_stat = mean / (std / used ** 0.5).clamp(min=1e-12)
            p_value = torch.from_numpy(student_t.sf(t_stat.numpy(), df=used - 1)).float()
            keep = (p_value >= alpha) | (torch.arange(len(alive)) == best)
            alive = alive[keep]
        errors[i] = per_pair[:used].sum(dim=0) / pairs_scored[i].clamp(min=1)
        survivors[i, alive] = True
    return Scores(errors, pairs_scored, evals, survivors)
