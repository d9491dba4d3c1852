"""Accuracy helpers for benchmarks: score a labelled tensor set with any strategy, in batches, with progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

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


def evaluate_folder(classifier: Any, dataset: Any, options: Any, show_progress: bool = True) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of `classifier` on an ImageFolder (classes by name)."""
    from noop_rt.data import describe_unknown, load_image
    from noop_rt.errors import BadInputError
    from noop_rt.runtime.classifier import images_per_call

    index = {name: i for i, name in enumerate(classifier.classes)}
    missing = [name for name in dataset.classes if name not in index]
    if missing:
        raise BadInputError(f"data classes not known to the classifier: {describe_unknown(missing, classifier.classes)}"
                            " (classifier classes: "
                            f"{', '.join(classifier.classes[:10])}{' ...' if len(classifier.classes) > 10 else ''})")
    c = len(classifier.classes)
    confusion = torch.zeros(c, c, dtype=torch.long)
    step = images_per_call(classifier, options.method)
    evals = 0
    start = time.perf_counter()
    bar = tqdm(total=len(dataset), desc=f"eval {options.method}", unit="img", disable=not show_progress,
               file=sys.stderr)
    for s in range(0, len(dataset), step):
        chunk = dataset.samples[s:s + step]
        batch = torch.stack([torch.from_numpy(load_image(p, classifier.backend.resolution)) for p, _ in chunk])
        scores, _ = classifier.score(batch, options)
        for (_, label), pred in zip(chunk, scores.predictions().tolist(), strict=True):
            confusion[index[dataset.classes[label]], pred] += 1
        evals += int(scores.unet_evals.sum())
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{confusion.diag().sum().item() / confusion.sum().item():.3f}")
    bar.close()
    seen = confusion.sum(dim=1)
    per_class = {name: (confusion[i, i].item() / seen[i].item()) for i, name in enumerate(classifier.classes)
                 if seen[i] > 0}
    return {"accuracy": confusion.diag().sum().item() / max(confusion.sum().item(), 1), "n": len(dataset),
            "per_class": per_class, "confusion": confusion.tolist(), "classes": classifier.classes,
            "method": options.method, "backend": classifier.backend.name,
            "unet_evals_per_image": evals / max(len(dataset), 1), "seconds": time.perf_counter() - start}
