"""The classifier: cached class embeddings + a backend + a strategy from `scoring.py`, timed per stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from noop_rt import scoring
from noop_rt.calibration import uncalibrated_tau
from noop_rt.errors import BadInputError
from noop_rt.robust import RobustConfig
from noop_rt.runtime.base import Backend


@dataclass
class ClassSpec:
    """What the classifier labels with: classes, their prompts, and what a checkpoint/bundle fixed."""

    classes: list[str]
    prompts: list[str]
    class_embeddings: torch.Tensor | None = None  # (C, L, D) cached; None: embed the prompts now
    tau: float | None = None  # fitted temperature; None: uncalibrated fallback
    t_star: int | None = None  # NoOp's timestep
    loss: str = "l2"
    template: str | None = None  # the prompt template new class names are embedded with

    @classmethod
    def from_checkpoint(cls, ckpt: Any) -> ClassSpec:
        """The class set a NoOp checkpoint was trained on, with its cached embeddings, tau, t* and error norm."""
        return cls(ckpt.classes, ckpt.prompts, ckpt.class_embeddings, ckpt.tau, ckpt.t_star, ckpt.loss, ckpt.template)


@dataclass
class StrategyOptions:
    method: str = "noop"
    noises: int = 100  # baseline: pairs; adaptive: pairs of the last stage; pruned: max pairs
    seed: int = 0
    loss: str | None = None  # None: the checkpoint's (or l2)
    alpha: float = 0.01  # pruned: t-test level
    round_size: int = 5  # pruned: pairs added per round
    robust: RobustConfig | None = None  # RDC likelihood maximisation before scoring (torch backend)


@dataclass
class Timings:
    """Seconds spent per stage for a batch of images (preprocess is filled in by the caller)."""

    preprocess: float = 0.0
    model: float = 0.0  # encoder + noise + UNet
    scoring: float = 0.0  # softmax, ranking, top-k
    images: int = 0

    def add(self, other: Timings) -> None:
        self.preprocess += other.preprocess
        self.model += other.model
        self.scoring += other.scoring
        self.images += other.images

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {"preprocess": 1e3 * self.preprocess / n, "model": 1e3 * self.model / n,
                "scoring": 1e3 * self.scoring / n}


@dataclass
class Prediction:
    top: list[dict[str, Any]]  # [{"class", "prob", "error"}] best first
    unet_evals: int
    label: int


@dataclass
class Classifier:
    backend: Backend
    spec: ClassSpec
    max_batch: int = 256
    emb: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not self.spec.classes:
            raise BadInputError("the class list is empty")
        emb = self.spec.class_embeddings
        emb = emb if emb is not None else self.backend.embed(self.spec.prompts)
        self.emb = emb.to(self.backend.torch_device, torch.float32)  # uploaded once, not per UNet call

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    def default_method(self) -> str:
        return "noop" if self.backend.has_noise and self.spec.t_star is not None else "baseline"

    def check_method(self, method: str) -> None:
        if method not in scoring.METHODS:
            raise BadInputError(f"unknown method {method!r}; choose one of {', '.join(scoring.METHODS)}")
        if method == "noop" and (not self.backend.has_noise or self.spec.t_star is None):
            raise BadInputError("method 'noop' needs a learned noise: pass --ckpt NAME.pt or --bundle DIR")

    def score(self, images: torch.Tensor, options: StrategyOptions) -> tuple[scoring.Scores, float]:
        """Scores for images (B, 3, H, W) in [-1, 1], and the seconds spent in the model (encoder+noise+UNet)."""
        self.check_method(options.method)
        loss = options.loss or self.spec.loss
        ab = self.backend.alphas_cumprod
        eps_fn = self.backend.predict_eps
        self.backend.synchronize()
        start = time.perf_counter()
        if options.robust is not None:
            purify = getattr(self.backend, "purify", None)
            if purify is None:
                raise BadInputError(f"--robust needs the torch backend (it takes gradients through the model); the "
                                    f"{self.backend.name} graphs are forward-only: pass --ckpt NAME.pt")
            images = purify(images, options.robust)
        z0 = self.backend.encode(images)
        if options.method == "noop":
            scores = scoring.noop_scores(eps_fn, z0, self.backend.noise(z0), int(self.spec.t_star), self.emb, ab,
                                         loss, self.max_batch)
        elif options.method == "baseline":
            scores = scoring.baseline_scores(eps_fn, z0, self.emb, ab, options.noises, options.seed, loss,
                                             self.max_batch)
        elif options.method == "adaptive":
            stages = scoring.default_adaptive_stages(options.noises, len(self.classes))
            scores = scoring.adaptive_scores(eps_fn, z0, self.emb, ab, stages, options.seed, loss, self.max_batch)
        else:
            scores = scoring.pruned_scores(eps_fn, z0, self.emb, ab, options.noises, options.round_size,
                                           options.alpha, options.seed, loss, self.max_batch)
        self.backend.synchronize()
        return scores, time.perf_counter() - start

    def tau_for(self, method: str, errors: torch.Tensor) -> float | torch.Tensor:
        """The fitted tau for the NoOp path; a per-image 1/std fallback for strategies it was not fitted on."""
        if method == "noop" and self.spec.tau is not None:
            return self.spec.tau
        return uncalibrated_tau(errors)

    def predict(self, images: torch.Tensor, options: StrategyOptions,
                top_k: int = 5) -> tuple[list[Prediction], Timings]:
        scores, model_s = self.score(images, options)
        start = time.perf_counter()
        probs = scores.probabilities(self.tau_for(options.method, scores.errors))
        ranking = scores.ranking()
        labels = scores.predictions()
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for i in range(len(images)):
            top = [{"class": self.classes[c], "prob": float(probs[i, c]), "error": float(scores.errors[i, c])}
                   for c in ranking[i, :k].tolist()]
            out.append(Prediction(top=top, unet_evals=int(scores.unet_evals[i]), label=int(labels[i])))
        return out, Timings(model=model_s, scoring=time.perf_counter() - start, images=len(images))


def images_per_call(classifier: Classifier, method: str) -> int:
    """Images per strategy call: NoOp batches B images into one B*C UNet batch up to max_batch."""
    if method == "noop":
        return max(1, classifier.max_batch // len(classifier.classes))
    return 1


def predict_arrays(
    classifier: Classifier, arrays: list[torch.Tensor], options: StrategyOptions, top_k: int = 5,
    progress: Any = None,
) -> tuple[list[Prediction], Timings, list[float]]:
    """Predictions for preprocessed images, batched; also per-image model+scoring seconds (batch time / batch size)."""
    step = images_per_call(classifier, options.method)
    predictions: list[Prediction] = []
    total = Timings()
    per_image: list[float] = []
    for start in range(0, len(arrays), step):
        batch = torch.stack(arrays[start:start + step])
        preds, timings = classifier.predict(batch, options, top_k)
        predictions += preds
        total.add(timings)
        per_image += [(timings.model + timings.scoring) / len(preds)] * len(preds)
        if progress is not None:
            progress(len(preds))
    return predictions, total, per_image
