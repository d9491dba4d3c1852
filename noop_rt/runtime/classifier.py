"""The classifier: a model on a backend, the class set it labels with, a strategy; typed results, timed per stage.

`Classifier.classify` is what the CLI, `batch`, `bench` and the server call. Settings resolve as defaults < the
artifact's own (its loss, t*, tau) < call arguments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.runtime import strategies
from noop_rt.runtime.choices import ESCALATIONS, LOSSES, METHODS
from noop_rt.runtime.drift import DriftMonitor
from noop_rt.runtime.errors import BadInputError, UsageError
from noop_rt.runtime.graph_model import GraphModel
from noop_rt.runtime.images import as_model_input, preprocessed_batch
from noop_rt.runtime.suggest import suggest, unexpected_keyword


def _log_warning(message: str) -> None:
    import logging

    logging.getLogger("noop_rt").warning(message)


ImageLike = Any  # a path (str/Path), a PIL image, or a numpy array (H, W, 3) uint8 / (3, R, R) float in [-1, 1]


@dataclass
class ClassSet:
    """What the classifier labels with: names, prompts, embeddings (C, L, D), and which names are untrained."""

    classes: list[str]
    prompts: list[str]
    embeddings: np.ndarray
    trained: bool  # exactly the class set (and prompts) the checkpoint/bundle was trained and calibrated on
    zero_shot: list[str] = field(default_factory=list)  # classes whose prompt NoOp never saw


@dataclass(frozen=True)
class ClassScore:
    label: str  # the class name
    prob: float
    error: float

    def to_json(self) -> dict[str, Any]:
        return {"class": self.label, "prob": self.prob, "error": self.error}


@dataclass
class Result:
    """One image's answer: the label, the top-k classes with probability and error, and what it cost."""

    image: str | None  # the path, or None for an in-memory image
    label: str
    top: list[ClassScore]
    method: str
    backend: str
    unet_evals: int
    timings: dict[str, float]  # ms per image: preprocess, model, scoring
    calibrated: bool = True  # probabilities use the fitted tau (else a per-image 1/std scale)
    zero_shot: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the label should be read with (a blank image, ...)
    escalated: bool | None = None  # cascade only: whether NoOp passed the image on to the escalation strategy

    @property
    def prob(self) -> float:
        return self.top[0].prob

    @property
    def latency_ms(self) -> float:
        return round(sum(self.timings.values()), 3)

    def to_json(self) -> dict[str, Any]:
        """The `classify --json` object (also what batch rows and the server's answers are made of). The design's
        keys (`top` entries of `class`, `prob`, `error`; `latency_ms`), plus `label`, `prob` and `timings` under the
        attributes' own names."""
        out: dict[str, Any] = {"image": self.image, "label": self.label, "prob": self.prob,
                               "top": [t.to_json() for t in self.top], "method": self.method, "backend": self.backend,
                               "latency_ms": self.latency_ms, "timings": dict(self.timings),
                               "unet_evals": self.unet_evals, "calibrated": self.calibrated}
        if self.escalated is not None:
            out["escalated"] = self.escalated
        if self.zero_shot:
            out["zero_shot_classes"] = self.zero_shot
        if self.warnings:
            out["warnings"] = self.warnings
        return out


class Classifier:
    """Labels images with a diffusion model. Build one with `noop_rt.load()`."""

    def __init__(self, model: GraphModel, class_set: ClassSet, *, method: str | None = None,
                 options: dict[str, Any] | None = None, notes: list[str] | None = None) -> None:
        if model.emb is not class_set.embeddings:
            raise ValueError("the model must score the class set's embeddings: GraphModel.with_classes(class_set)")
        self.model = model
        self.class_set = class_set
        self.notes = list(notes or [])  # one-line remarks for the user (stale tau, zero-shot classes, fallbacks)
        self.options = dict(options or {})  # strategy options (loss, pairs, stages, seed, ...) set at load time
        self.method = method or self.default_method()
        self.check_method(self.method)
        if self.method == "cascade" and not model.info.cascade:
            self.notes.append(f"{model.info.name} has no fitted cascade (trained before noop-rt 0.4): threshold "
                              f"{strategies.DEFAULT_CASCADE_THRESHOLD}, shortlist {strategies.DEFAULT_SHORTLIST}, "
                              f"escalate {strategies.DEFAULT_ESCALATE} (retrain to fit them, or set "
                              "--cascade-threshold/--shortlist/--escalate)")
        self.drift = DriftMonitor.from_profile(model.info.drift)  # None: no validation profile to compare with
        self.on_drift: Callable[[str], None] = _log_warning  # where a drift warning goes (the CLI prints it)
        self._drift_lock = threading.Lock()  # classify may run in several threads at once (a server's batches)

    def report_to(self, stream: Any) -> None:
        """Print the loader's notes to `stream` (one `note:` line each), and send drift warnings there from now on
        (`warning:` lines) instead of the `noop_rt` logger."""
        for note in self.notes:
            print(f"note: {note}", file=stream)
        self.on_drift = lambda message: print(f"warning: {message}", file=stream)

    def drift_report(self) -> dict[str, Any] | None:
        """The drift monitor's report (None without a validation profile), consistent while other threads classify."""
        if self.drift is None:
            return None
        with self._drift_lock:
            return self.drift.report()

    # ------------------------------------------------------------------------------------------ what it is
    @property
    def classes(self) -> list[str]:
        return self.class_set.classes

    @property
    def backend(self) -> str:
        return self.model.runner.name

    @property
    def device(self) -> str:
        return self.model.runner.device

    @property
    def info(self):
        return self.model.info

    @property
    def resolution(self) -> int:
        return self.model.info.resolution

    def unet_gflop(self) -> float | None:
        """GFLOP of one UNet sample: counted by the torch backend, or the count a bundle recorded at export; None
        where neither is known (a bundle exported before the count was recorded)."""
        counted = self.model.runner.unet_gflop()
        if counted is not None:
            return counted
        recorded = (self.info.manifest or {}).get("unet_gflop_per_sample")
        return None if recorded is None else float(recorded)

    def default_method(self) -> str:
        return "noop" if self.model.info.has_noise else "baseline"

    def check_method(self, method: str) -> None:
        if method not in strategies.STRATEGIES:
            raise suggest(method, METHODS, "method")
        if method in ("noop", "cascade") and not self.model.info.has_noise:
            raise UsageError(f"method {method!r} needs a learned noise: load a NoOp checkpoint (NAME.pt) or bundle; "
                             f"{self.model.info.location} is a plain diffusion model (use baseline, adaptive or "
                             "pruned)")

    def config(self, method: str | None = None, **options: Any) -> strategies.StrategyConfig:
        """The strategy config: the classifier's options < call options; the loss defaults to the model's own."""
        method = method or self.method
        self.check_method(method)
        unknown = [k for k in options if k not in strategies.OPTIONS]
        if unknown:
            raise unexpected_keyword("classify()", unknown[0], [*strategies.OPTIONS, "method", "top_k", "progress"])
        merged = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        merged.setdefault("loss", self.model.info.loss)
        if merged["loss"] not in LOSSES:
            raise suggest(str(merged["loss"]), LOSSES, "loss")
        if method == "pruned" and "pairs" in merged:
            merged.setdefault("max_pairs", merged["pairs"])
        if method == "adaptive" and "stages" not in merged and "pairs" in merged:  # scaled Pets schedule
            n = int(merged["pairs"])
            merged["stages"] = ((max(1, n // 10), min(5, len(self.classes))), (n, 1))
        try:
            if method == "cascade":
                return self._cascade_config(merged, options)
            return strategies.make_config(method, **merged)
        except (TypeError, ValueError) as exc:
            raise BadInputError(str(exc)) from None

    def _cascade_config(self, merged: dict[str, Any], options: dict[str, Any]) -> strategies.CascadeConfig:
        """The cascade's settings: defaults < the artifact's fitted ones < load and call options; the escalation
        strategy's config from the same options; NoOp's tau where it applies (trained classes, its own loss)."""
        fitted = self.model.info.cascade or {}
        escalate = str(merged.get("escalate") or fitted.get("escalate") or strategies.DEFAULT_ESCALATE)
        if escalate not in ESCALATIONS:
            raise suggest(escalate, ESCALATIONS, "escalation strategy")
        calibrated = self.class_set.trained and merged["loss"] == self.model.info.loss
        drift = self.model.info.drift or {}
        bound = fitted.get("error_bound", drift.get("best_error_quantiles", {}).get("0.99"))
        return strategies.CascadeConfig(
            cascade_threshold=float(merged.get("cascade_threshold", fitted.get("threshold",
                                                                             strategies.DEFAULT_CASCADE_THRESHOLD))),
            shortlist=int(merged.get("shortlist", fitted.get("shortlist", strategies.DEFAULT_SHORTLIST))),
            escalate=escalate, loss=merged["loss"], tau=self.model.info.tau if calibrated else None,
            error_bound=None if bound is None or not calibrated else float(bound),
            escalation=self.config(escalate, **{"loss": strategies.ZERO_SHOT_LOSS, **self._fitted_escalation(escalate),
                                                **self.options, **options}))

    def _fitted_escalation(self, escalate: str) -> dict[str, Any]:
        """The escalation settings the cascade was fitted with (when `escalate` is the fitted strategy)."""
        fitted = self.model.info.cascade or {}
        if fitted.get("escalate") != escalate:
            return {}
        return {k: tuple(map(tuple, v)) if k == "stages" else v
                for k, v in (fitted.get("escalation_options") or {}).items()}

    def familiar_error_bound(self) -> float | None:
        """The largest best NoOp error of the validation split (the cascade's fit), else the drift profile's 99th
        percentile of it; None where neither was recorded. An image above it is unlike the training data."""
        fitted = (self.model.info.cascade or {}).get("error_bound")
        if fitted is not None:
            return float(fitted)
        quantile = ((self.model.info.drift or {}).get("best_error_quantiles") or {}).get("0.99")
        return None if quantile is None else float(quantile)

    def calibrated(self, method: str, config: strategies.StrategyConfig) -> bool:
        """The fitted tau applies: NoOp, the trained classes and prompts, the loss it was fitted with."""
        info = self.model.info
        return (method in ("noop", "cascade") and info.tau is not None and self.class_set.trained
                and getattr(config, "loss", None) == info.loss)

    # ------------------------------------------------------------------------------------------ running
    def score(self, images: np.ndarray, method: str | None = None, progress: strategies.Progress = None,
              **options: Any) -> tuple[strategies.Scores, float]:
        """Scores for preprocessed images (B, 3, R, R) in [-1, 1], and the seconds spent in the model."""
        method = method or self.method
        config = self.config(method, **options)
        robust = options.get("robust") or self.options.get("robust")
        start = time.perf_counter()
        if robust is not None:
            images = self.model.runner.purify(images, robust)
        scores = strategies.STRATEGIES[method].fn(self.model, images, config, progress)
        self.model.runner.synchronize()
        return scores, time.perf_counter() - start

    def classify(self, images: ImageLike | Sequence[ImageLike] | np.ndarray, *, top_k: int = 5,
                 method: str | None = None, progress: Callable[[int], None] | None = None,
                 **options: Any) -> Result | list[Result]:
        """Classify images: one path, PIL image, bytes of an image file or numpy array gives one Result; a list of
        them, or a preprocessed batch (B, 3, R, R) float32 in [-1, 1], gives a list. Arrays: (H, W, 3) or (H, W) uint8
        images are preprocessed like files, a (3, R, R) float array in [-1, 1] is taken as preprocessed. Strategy
        options (loss, pairs, stages, seed, alpha, round_size, robust) override the loaded ones; an unknown one is a
        TypeError. `progress(n)` is called as images finish.

        Images go to the model in one place: here, `images_per_call` at a time for NoOp (one B*C UNet batch), one at a
        time for the multi-pass strategies."""
        batch = isinstance(images, np.ndarray) and images.ndim == 4
        single = not batch and not isinstance(images, (list, tuple))
        items: Sequence[Any] = images if batch else [images] if single else list(images)  # type: ignore[assignment]
        if len(items) == 0:
            raise BadInputError("no images given")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise BadInputError(f"top_k must be a whole number >= 1, got {top_k!r}")
        method = method or self.method
        config = self.config(method, **options)
        calibrated = self.calibrated(method, config)
        step = max(1, self.model.images_per_call()) if method in ("noop", "cascade") else 1
        results: list[Result] = []
        for s in range(0, len(items), step):
            chunk = items[s:s + step]
            t0 = time.perf_counter()
            notes: list[list[str]] = [[] for _ in chunk]
            arrays = (preprocessed_batch(chunk, self.resolution) if batch
                      else np.stack([as_model_input(x, self.resolution, n) for x, n in zip(chunk, notes, strict=True)]))
            preprocess_s = time.perf_counter() - t0
            scores, model_s = self.score(arrays, method, **options)
            names = [None] * len(chunk) if batch else [str(x) if isinstance(x, (str, Path)) else None for x in chunk]
            results += self._results(scores, names, notes, method, calibrated, top_k, preprocess_s, model_s)
            if progress is not None:
                progress(len(chunk))
        return results[0] if single else results

    def _results(self, scores: strategies.Scores, names: list[str | None], notes: list[list[str]], method: str,
                 calibrated: bool, top_k: int, preprocess_s: float, model_s: float) -> list[Result]:
        """Typed results of one scored chunk: probabilities (the fitted tau or a per-image scale), the drift
        monitor's update, the top-k ranking, and each stage's time per image."""
        t0 = time.perf_counter()
        stage1 = scores.errors if scores.stage1 is None else scores.stage1  # NoOp's pass (cascade: its first stage)
        tau = self.model.info.tau if calibrated else strategies.uncalibrated_tau(stage1)
        probs = (scores.probabilities(tau) if scores.stage1 is None
                 else strategies.softmax(-np.asarray(tau) * stage1))
        if calibrated and self.drift is not None:  # the profile holds for the calibrated NoOp pass only
            with self._drift_lock:
                warning = self.drift.update(probs.max(axis=1), stage1.min(axis=1), probs.argmax(axis=1))
            if warning is not None:
                self.on_drift(warning)
        escalated = np.zeros(len(names), bool) if scores.escalated is None else scores.escalated
        if escalated.any():  # the escalation's probabilities over its survivors, each row at its own 1/std scale
            row_tau = np.ones((len(names), 1))
            for i in np.flatnonzero(escalated).tolist():
                row_tau[i] = strategies.uncalibrated_tau(scores.errors[i:i + 1, scores.survivors[i]])
            probs[escalated] = scores.probabilities(row_tau)[escalated]
        ranking = scores.ranking()[:, :min(top_k, len(self.classes))]
        n = len(names)
        per = {"preprocess": 1e3 * preprocess_s / n, "model": 1e3 * model_s / n,
               "scoring": 1e3 * (time.perf_counter() - t0) / n}
        bound = self.familiar_error_bound() if calibrated else None
        best = stage1.min(axis=1)
        out = []
        for i, (name, said) in enumerate(zip(names, notes, strict=True)):
            top = [ClassScore(self.classes[c], float(probs[i, c]), float(scores.errors[i, c]))
                   for c in ranking[i].tolist()]
            if bound is not None and best[i] > bound:  # NoOp denoises it worse than any validation image
                said = [*said, f"unlike the training data: its best error {best[i]:.4g} is above every validation "
                               f"image's ({bound:.4g}); the label may well be wrong"]
            out.append(Result(image=name, label=top[0].label, top=top, method=method, backend=self.backend,
                              unet_evals=int(scores.unet_evals[i]), timings=dict(per),
                              calibrated=calibrated and not escalated[i], zero_shot=list(self.class_set.zero_shot),
                              warnings=said, escalated=None if scores.escalated is None else bool(escalated[i])))
        return out

    def speed_line(self, results: Sequence[Result], method: str | None = None) -> str:
        """A one-line speed summary like the detection tools print: each stage's mean time per image."""
        n = max(len(results), 1)
        ms = {stage: sum(r.timings.get(stage, 0.0) for r in results) / n
              for stage in ("preprocess", "model", "scoring")}
        r = self.resolution
        return (f"Speed: {ms['preprocess']:.1f} ms preprocess, {ms['model']:.1f} ms noise+UNet, {ms['scoring']:.1f} "
                f"ms scoring per image at {r}x{r} ({len(self.classes)} classes, method {method or self.method}, "
                f"backend {self.backend} on {self.device})")

    def close(self) -> None:
        self.model.runner.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Classifier({self.model.info.name!r}, {len(self.classes)} classes, method={self.method!r}, "
                f"backend={self.backend!r} on {self.device!r})")
