"""Fit the cascade's defaults (`--method cascade`) on the validation split, at the end of `train`.

The cascade answers an image with NoOp's one pass when NoOp is sure (top-1 probability softmax(-tau * err) at least
the threshold) and the image is familiar (its best stage-1 error no larger than any seen on the validation split);
otherwise a zero-shot strategy scores the image's shortlist (`runtime/strategies.py: cascade`). Fitted here:

- `escalate`: the zero-shot strategy with the best validation accuracy among `ESCALATION_CANDIDATES` (ties: fewer
  UNet evaluations). The 100-pair baseline is not a candidate: at 100 x C evaluations it never saves anything.
- `threshold`: the lowest threshold at which the validation images NoOp would answer are classified at least as
  accurately as the escalation strategy classifies the split (selective accuracy >= the escalation's accuracy). Why
  the top-1 probability rather than the margin between the two best errors: with the fitted tau the two order
  images almost alike on the demo, and the probability is the quantity the drift profile already records. Why the
  familiarity test beside it: off its domain NoOp is confidently wrong (on the demo bundle, 31 % of `printed` digits
  reach a top-1 probability of 0.9 at 32 % accuracy), but there its best error is mostly beyond anything validation
  showed (with the demo's fit every `printed` digit and 90 % of `thick_affine` escalate;
  benchmarks/results/cascade.md).
- `shortlist`: the cap on the classes an escalation scores: the fewest best stage-1 classes that hold the true class
  for every validation image NoOp gets wrong or is unsure of, at least `MIN_SHORTLIST`; an image unlike the
  validation split escalates on this many classes.
- `error_bound`: the largest best stage-1 error on the validation split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noop_rt.runtime import strategies
from noop_rt.train.backbones import Backbone
from noop_rt.train.diffusion_error import ClassErrors, class_errors

PAIRS = 100  # the candidates' budget of (t, eps) pairs per class: the 100-pair baseline's grid


def escalation_options(name: str, num_classes: int) -> dict[str, Any]:
    """A candidate's settings at the same 100-pair budget: pruned up to 100 pairs (rounds of 5, alpha 0.01);
    adaptive 10 pairs for every class keeping 5, then 100 (Li et al.'s Pets schedule at that budget); both with the l2
    error, the zero-shot default (NoOp's own l1 is 32 % against l2's 56 % for the 10-pair baseline on 50 `printed`
    digits of the demo)."""
    if name == "adaptive":
        return {"stages": [[PAIRS // 10, min(5, num_classes)], [PAIRS, 1]], "loss": strategies.ZERO_SHOT_LOSS}
    return {"max_pairs": PAIRS, "loss": strategies.ZERO_SHOT_LOSS}


ESCALATION_CANDIDATES = ("pruned", "adaptive")
FIT_IMAGES = 100  # validation images the escalation candidates are scored on (seeded subset when there are more)
MIN_SHORTLIST = 3


class LatentScorer:
    """A `strategies.ScoringModel` over the torch backbone fed clean latents (`encode` is the identity), so the
    zero-shot strategies run on the validation split's cached z0."""

    def __init__(self, backbone: Backbone, class_embeddings: torch.Tensor, max_batch: int) -> None:
        self.backbone = backbone
        self.emb = class_embeddings.to(backbone.device, torch.float32)
        self.max_batch = max_batch
        self.num_classes = int(self.emb.shape[0])
        self.latent_shape = tuple(backbone.latent_shape)
        self.num_train_timesteps = int(backbone.num_train_timesteps)
        self._modules: dict[str, ClassErrors] = {}

    def noop_errors(self, images: np.ndarray, loss: str) -> np.ndarray:
        raise NotImplementedError("the cascade fit scores zero-shot strategies only")

    def encode(self, images: np.ndarray) -> np.ndarray:
        return images

    @torch.no_grad()
    def class_errors(self, z0: np.ndarray, eps: np.ndarray, t: np.ndarray, classes: np.ndarray | None, loss: str,
                     progress: strategies.Progress = None) -> np.ndarray:
        if loss not in self._modules:
            self._modules[loss] = self.backbone.class_errors((loss,))
        device = self.backbone.device
        emb = self.emb if classes is None else self.emb[torch.as_tensor(np.asarray(classes), device=device)]
        out = class_errors(self._modules[loss], torch.from_numpy(np.ascontiguousarray(z0)).to(device),
                           torch.from_numpy(np.ascontiguousarray(eps)).to(device),
                           torch.from_numpy(np.asarray(t, np.float32)).to(device), emb, self.max_batch)
        if progress is not None:
            progress(out.numel())
        return out.float().cpu().numpy()


def choose_settings(stage1_errors: np.ndarray, labels: np.ndarray, tau: float, target_accuracy: float
                    ) -> dict[str, float | int]:
    """Threshold, shortlist cap and error bound from NoOp's validation errors (N, C), the labels (N,), the fitted
    tau and the accuracy the answered images must reach (see the module docstring)."""
    errors = np.asarray(stage1_errors, np.float64)
    labels = np.asarray(labels, np.int64)
    probs = strategies.softmax(-tau * errors)
    top1 = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    best_error = errors.min(axis=1)
    error_bound = float(best_error.max())
    threshold = 1.0
    for candidate in np.unique(top1):  # ascending: the first that reaches the target wins
        answered = top1 >= candidate
        if correct[answered].mean() >= target_accuracy:
            threshold = float(candidate)
            break
    familiar = best_error <= error_bound
    unsure = ~correct | (top1 < threshold) | ~familiar
    ranks = (np.argsort(-probs, axis=1, kind="stable") == labels[:, None]).argmax(axis=1)
    needed = int(ranks[unsure].max()) + 1 if unsure.any() else MIN_SHORTLIST
    return {"threshold": math.floor(threshold * 1e6) / 1e6,  # rounded down: the images it was fitted on still pass
            "shortlist": int(min(errors.shape[1], max(MIN_SHORTLIST, needed))),
            "error_bound": error_bound}


def fit_cascade(backbone: Backbone, class_embeddings: torch.Tensor, z_val: torch.Tensor, y_val: torch.Tensor,
                stage1_errors: np.ndarray, tau: float, max_batch: int, seed: int = 0) -> dict[str, Any]:
    """The cascade's fitted defaults, as stored in the checkpoint (`train["cascade"]`) and the bundle manifest."""
    labels = y_val.cpu().numpy().astype(np.int64)
    rng = np.random.default_rng(seed)
    subset = np.arange(len(labels)) if len(labels) <= FIT_IMAGES else np.sort(
        rng.choice(len(labels), FIT_IMAGES, replace=False))
    scorer = LatentScorer(backbone, class_embeddings, max_batch)
    z = z_val[torch.as_tensor(subset)].cpu().float().numpy()
    candidates: dict[str, dict[str, float]] = {}
    for name in ESCALATION_CANDIDATES:
        options = escalation_options(name, scorer.num_classes)
        config = strategies.make_config(name, seed=seed, **{
            k: tuple(map(tuple, v)) if k == "stages" else v for k, v in options.items()})
        scores = strategies.STRATEGIES[name].fn(scorer, z, config)
        candidates[name] = {"accuracy": float((scores.predictions() == labels[subset]).mean()),
                            "unet_evals_per_image": float(scores.unet_evals.mean()), "options": options}
    escalate = min(candidates, key=lambda n: (-candidates[n]["accuracy"], candidates[n]["unet_evals_per_image"]))
    settings = choose_settings(stage1_errors, labels, tau, candidates[escalate]["accuracy"])
    return {**settings, "escalate": escalate, "escalation_options": candidates[escalate]["options"],
            "candidates": candidates, "fit_images": len(subset),
            "val_images": len(labels), "rule": "runtime threshold/shortlist/error bound: noop_rt/train/cascade_fit.py"}


def fit_checkpoint(ckpt_path: str | Path, data: str | Path, bundle: str | Path | None = None, max_batch: int = 256,
                   seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """`noop-rt fit-cascade`: fit the cascade of a trained checkpoint on a labelled image folder (its validation
    split; class folders named like the checkpoint's classes) and write it into the checkpoint, and into `bundle`'s
    manifest when given (both through a temporary file and a rename)."""
    import json

    from noop_rt.runtime.bundle import sha256_file, write_json_atomic
    from noop_rt.runtime.classes import ImageFolder
    from noop_rt.runtime.errors import BadInputError
    from noop_rt.train.backbones import pick_device
    from noop_rt.train.checkpoint import checkpoint_backbone, load_checkpoint, save_checkpoint
    from noop_rt.train.noop import encode_paths, evaluate_noise

    path = Path(ckpt_path)
    ckpt = load_checkpoint(path)
    dataset = ImageFolder.scan(data)
    index = {name: i for i, name in enumerate(ckpt.classes)}
    unknown = [c for c in dataset.classes if c not in index]
    if unknown:
        raise BadInputError(f"class folders not among the checkpoint's classes: {', '.join(unknown[:5])}")
    manifest_path = None if bundle is None else Path(bundle) / "manifest.json"
    if manifest_path is not None and not manifest_path.is_file():
        raise BadInputError(f"not a bundle (no manifest.json): {bundle}")
    backbone = checkpoint_backbone(ckpt, path, device=pick_device(device))
    z_val = encode_paths(backbone, [p for p, _ in dataset.samples])
    y_val = torch.tensor([index[dataset.classes[label]] for _, label in dataset.samples])
    emb = ckpt.class_embeddings.float()
    _, errors = evaluate_noise(backbone, ckpt.noise_model().to(backbone.device), emb, z_val, y_val, ckpt.t_star,
                               ckpt.loss, max_batch)
    fitted = fit_cascade(backbone, emb, z_val, y_val, errors.double().numpy(), ckpt.tau, max_batch, seed)
    fitted["data"] = str(Path(data))
    ckpt.train["cascade"] = fitted
    save_checkpoint(ckpt, path)
    if manifest_path is not None:
        manifest = json.loads(manifest_path.read_text())
        manifest["cascade"] = fitted
        if (manifest.get("source_ckpt") or {}).get("path"):
            manifest["source_ckpt"]["sha256"] = sha256_file(path)
        write_json_atomic(manifest_path, manifest)
    return fitted
