"""Accuracy helpers for the benchmarks: the demo's held-out digits, any strategy scored over a set in chunks with
progress, ONE random noise at t (the unstable classifier NoOp fixes), and the protocol record each result carries.

Models are `noop_rt.load(...)` classifiers on the torch backend: `classifier.model` is the numpy `ScoringModel` the
strategies of `runtime/strategies.py` run on, over the very torch modules (`train/diffusion_error.py`) that training
runs and `export` traces.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from noop_rt.jobs import evaluate
from noop_rt.runtime import strategies
from noop_rt.runtime.classifier import Classifier
from noop_rt.runtime.errors import BadInputError

DEMO_TEST = ("noop_rt.demo.digits.split_tensors('test'): the held-out sklearn digits (stratified 20 %, seed 0), "
             "8x8 scans bilinear-resized to 16x16 grey, replicated to RGB, scaled to [-1, 1] (exactly what loading "
             "the PNGs of `noop-rt demo-data` gives); the first `images` of them in index order")


@dataclass
class LabelledSet:
    """Preprocessed images and their class names."""

    images: np.ndarray  # (N, 3, R, R) float32 in [-1, 1]
    names: list[str]  # (N,) class name of each image
    description: str  # where the images come from and how they were preprocessed

    def __len__(self) -> int:
        return len(self.names)

    def record(self) -> dict[str, Any]:
        return {"set": self.description, "images": len(self)}


def demo_test_set(images: int | None = None) -> LabelledSet:
    """The demo's 360 held-out digits (or the first `images` of them), labelled with the digit names."""
    from noop_rt.demo import DIGIT_NAMES
    from noop_rt.demo.digits import split_tensors

    x, y = split_tensors("test")
    n = len(y) if images is None else max(1, min(images, len(y)))
    return LabelledSet(np.ascontiguousarray(x[:n].numpy(), dtype=np.float32),
                       [DIGIT_NAMES[int(k)] for k in y[:n]], DEMO_TEST)


def demo_backbone(max_batch: int = 512) -> Classifier:
    """The demo backbone alone (zero-shot strategies), classes in digit order with the plain demo prompts."""
    import noop_rt
    from noop_rt.demo import DEMO_TEMPLATE, DIGIT_NAMES, MODEL_DIR

    return noop_rt.load(MODEL_DIR, backend="torch", device="cpu", classes=list(DIGIT_NAMES), template=DEMO_TEMPLATE,
                        method="baseline", max_batch=max_batch)


def noop_classifier(ckpt: str | Path | None = None, max_batch: int = 512) -> Classifier:
    """A NoOp checkpoint (default: the shipped demo `digits.pt`) on the torch backend, with its trained classes."""
    import noop_rt
    from noop_rt.demo import CKPT_PATH

    return noop_rt.load(ckpt or CKPT_PATH, backend="torch", device="cpu", method="noop", max_batch=max_batch)


# ---------------------------------------------------------------------------------------------- scores
def targets(classifier: Classifier, names: Sequence[str]) -> np.ndarray:
    """Column index in `classifier.classes` of each class name. (N,) int64"""
    index = {name: i for i, name in enumerate(classifier.classes)}
    missing = sorted({n for n in names if n not in index})
    if missing:
        raise BadInputError(f"classes not known to the classifier: {', '.join(missing[:5])}")
    return np.array([index[n] for n in names], dtype=np.int64)


def accuracy(scores: strategies.Scores, target: np.ndarray) -> float:
    """Top-1 accuracy; `target` are column indices (see `targets`)."""
    return float((scores.predictions() == target).mean())


def score_set(classifier: Classifier, images: np.ndarray, method: str | None = None, chunk: int = 16,
              desc: str | None = None, **options: Any) -> strategies.Scores:
    """`classifier.score` over `images` in chunks of `chunk` images (a progress bar on stderr when `desc` is given);
    options (pairs, stages, seed, loss, ...) override the classifier's own."""
    parts = []
    for i in tqdm(range(0, len(images), chunk), desc=desc, file=sys.stderr, disable=desc is None, leave=False):
        scores, _ = classifier.score(images[i:i + chunk], method, **options)
        parts.append(scores)
    return strategies.Scores.concat(parts)


def single_noise(classifier: Classifier, z0: np.ndarray, t: int, seed: int, loss: str = "l2") -> strategies.Scores:
    """ONE random (t, eps) pair shared by every image and class, eps = strategies.noise_bank(1, ..., seed); z0 from
    `classifier.model.encode`."""
    model = classifier.model
    eps = strategies.noise_bank(1, tuple(model.latent_shape), seed)  # (1, c, h, w)
    errors = model.class_errors(z0, np.broadcast_to(eps, z0.shape), np.full(len(z0), t, np.int64), None, loss)
    b, c = errors.shape
    return strategies.Scores(errors.astype(np.float64), np.ones((b, c), np.int64), np.full(b, c, np.int64))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# ---------------------------------------------------------------------------------------------- protocol
def model_protocol(classifier: Classifier, images: int) -> dict[str, Any]:
    """`evaluate.protocol` of the classifier without its strategy (recorded per run): classes, prompts, zero-shot
    classes, preprocessing, image count, model (name, source, fingerprint, precision), backend, noop-rt version."""
    out = evaluate.protocol(classifier, images)
    for key in ("strategy", "loss", "tau"):  # per run (accuracy is argmin: tau does not enter it)
        out.pop(key, None)
    return _plain(out)


def strategy_protocol(classifier: Classifier, method: str | None = None, **options: Any) -> dict[str, Any]:
    """`strategies.protocol` of `method` with `options` over the classifier's own settings (loss defaults to the
    model's): method, its settings, loss, seed, timestep grid, noise source."""
    method = method or classifier.method
    info = classifier.model.info
    return _plain(strategies.protocol(method, classifier.config(method, **options), info.num_train_timesteps,
                                   info.t_star))


def single_noise_protocol(classifier: Classifier, t: int, seeds: Sequence[int], loss: str) -> dict[str, Any]:
    shape = ", ".join(map(str, classifier.model.latent_shape))
    return {"method": "one random noise", "t": t, "loss": loss, "seeds": list(seeds), "timesteps": [t],
            "noise": f"strategies.noise_bank(1, ({shape}), seed): numpy default_rng(seed).standard_normal float32, the "
                     "same eps for every image and class"}


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The markdown "Protocol" section: the whole record as a JSON block."""
    return ["", "## Protocol", "", "Everything that fixes the figures above (also in the JSON file under "
            "`protocol`).", "", "```json", json.dumps(protocol, indent=2), "```"]


def same_record(a: Any, b: Any) -> bool:
    """Two protocol records (or parts) are equal once both went through JSON."""
    return _plain(a) == _plain(b)


def command_line(script: str) -> str:
    """`python benchmarks/SCRIPT` with the arguments this run was given."""
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, sys.argv[1:])])


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
