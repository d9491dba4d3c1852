"""A model on a backend: what it is (`ModelInfo`, from a bundle manifest or a checkpoint) and the operations the
strategies need (`GraphModel`, the `strategies.ScoringModel` of every backend), batched to the model's max UNet batch.

Only images, z0, eps, t and errors cross between host and engine; the (B*C, c, h, w) UNet tensors stay inside the
graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from noop_rt.runtime.backends.base import GraphRunner
from noop_rt.runtime.choices import LOSSES
from noop_rt.runtime.errors import BadInputError, NonFiniteError
from noop_rt.runtime.graph_specs import CLASSIFIER, ENCODER, NOISE, SCORER, TEXT_ENCODER, error_output
from noop_rt.runtime.strategies import Progress


@dataclass
class ModelInfo:
    """What a loaded model is, whatever the backend."""

    name: str  # the model's name: the checkpoint's stem ("digits" for the demo)
    source: str  # "bundle" | "checkpoint" | "diffusers"
    location: str  # path of the bundle / checkpoint / folder
    resolution: int
    latent_shape: tuple[int, int, int]
    num_train_timesteps: int
    prediction_type: str
    max_batch: int  # largest UNet batch per call (B*C)
    fingerprint: str  # identifies the weights: bundle cache key, checkpoint sha256, or folder fingerprint
    classes: list[str] | None = None  # trained classes (checkpoint/bundle)
    prompts: list[str] | None = None
    template: str | None = None
    t_star: int | None = None  # NoOp's timestep; None: no learned noise
    tau: float | None = None  # fitted temperature for the trained classes and loss
    loss: str = "l2"  # the error norm NoOp was trained (and tau fitted) with; zero-shot default l2
    prompt_tuned: bool = False
    precision: str = "fp32"
    scorer_losses: tuple[str, ...] = LOSSES
    preprocessing: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None  # the bundle's manifest, when there is one
    drift: dict[str, Any] | None = None  # the validation split's confidence profile
    cascade: dict[str, Any] | None = None  # the cascade's threshold, shortlist and escalation fitted on validation

    @property
    def has_noise(self) -> bool:
        return self.t_star is not None

    @classmethod
    def from_manifest(cls, m: dict[str, Any], location: str) -> ModelInfo:
        scorer = m["graphs"].get(SCORER, {"outputs": []})
        losses = tuple(o["name"].removeprefix("errors_") for o in scorer["outputs"])
        return cls(name=str(m["name"]), source="bundle", location=location, resolution=int(m["resolution"]),
                   latent_shape=tuple(int(x) for x in m["latent_shape"]),  # type: ignore[arg-type]
                   num_train_timesteps=int(m["num_train_timesteps"]),
                   prediction_type=str(m["backbone"]["prediction_type"]), max_batch=int(m["max_batch"]),
                   fingerprint=str(m.get("cache_key", "")), classes=list(m["classes"]), prompts=list(m["prompts"]),
                   template=m.get("template"), t_star=int(m["t_star"]), tau=float(m["tau"]), loss=str(m["loss"]),
                   prompt_tuned=bool(m.get("prompt_tuned")), precision=str(m["precision"]), scorer_losses=losses,
                   preprocessing=dict(m["preprocessing"]), manifest=m, drift=m.get("drift"),
                   cascade=m.get("cascade"))


def default_preprocessing(resolution: int) -> dict[str, Any]:
    """What `runtime/images.py` does to a file before the classifier graph sees it, for a runtime that has only the
    bundle (a third-party server must do the same to get the same labels)."""
    return {"resolution": resolution,
            "decode": "the first frame of an animated image; EXIF orientation applied; an image 12 times its resized "
                      "size or more first reduced to no less than 6 times it (JPEG: decoded at 1/2, 1/4 or 1/8 scale; "
                      "others: Pillow reduce, a box average, alpha premultiplied), the resize keeping the full "
                      "image's arithmetic",
            "alpha": "composited on white (255, 255, 255) before resizing (RGBA, LA, PA, and P with transparency)",
            "modes": "16-bit greyscale scaled by 65535 (by 255 when no value exceeds 255); palette, greyscale and CMYK "
                     "converted to RGB by Pillow",
            "resize": "shorter side to resolution, bicubic (torchvision Resize arithmetic: the longer side "
                      "int(resolution * long / short))",
            "crop": "centre, resolution x resolution (torchvision CenterCrop arithmetic: offsets rounded half to even)",
            "channels": "RGB", "range": [-1.0, 1.0], "scale": "x / 127.5 - 1", "layout": "NCHW float32"}


class GraphModel:
    """`strategies.ScoringModel` over any GraphRunner, with the class embeddings it scores against."""

    def __init__(self, runner: GraphRunner, info: ModelInfo, tokenize: Callable[[list[str]], np.ndarray] | None,
                 class_embeddings: np.ndarray | None = None, custom_classes: bool = False) -> None:
        self.runner = runner
        self.info = info
        self.tokenize = tokenize
        self.emb = class_embeddings  # (C, L, D) float32
        self.custom_classes = custom_classes  # the classifier graph gets `emb` fed instead of its built-in default

    def with_classes(self, embeddings: np.ndarray, trained: bool) -> GraphModel:
        """The same runner scoring another class set: `embeddings` (C, L, D); `trained`: the set the classifier
        graph was exported with (its built-in default)."""
        return GraphModel(self.runner, self.info, self.tokenize, embeddings, custom_classes=not trained)

    def classifier_fits_classes(self) -> bool:
        """Whether the classifier graph can score the current class set: its built-in (trained) classes always;
        others only where the graph still takes a `class_embeddings` input (bundles before 0.3, the torch backend),
        the engine lets it be fed and the graph is not INT8 (quantized for the trained embeddings' range).
        Otherwise NoOp runs through encoder, noise and scorer."""
        if not self.custom_classes:
            return True
        spec = self.runner.graph_spec(CLASSIFIER)
        takes = spec is None or any(t.name == "class_embeddings" for t in spec.inputs)  # bundles before 0.3 do
        return takes and self.runner.classifier_takes_embeddings and self.info.precision != "int8"

    def prepare(self, method: str) -> None:
        """Load the graphs `method` runs now (sessions are otherwise created on first use), so the first image's
        time is inference, not engine start-up."""
        noop_direct = method == "noop" and self.runner.has(CLASSIFIER) and self.classifier_fits_classes()
        for graph in ((CLASSIFIER,) if noop_direct else (ENCODER, NOISE, SCORER) if method == "noop"
                      else (ENCODER, SCORER)):
            self.runner.load(graph)

    # ------------------------------------------------------------------------------------------ ScoringModel
    @property
    def num_classes(self) -> int:
        return 0 if self.emb is None else int(self.emb.shape[0])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.info.latent_shape

    @property
    def num_train_timesteps(self) -> int:
        return self.info.num_train_timesteps

    def images_per_call(self) -> int:
        return max(1, self.info.max_batch // max(1, self.num_classes))

    def noop_errors(self, images: np.ndarray, loss: str) -> np.ndarray:
        if not self.info.has_noise:
            raise BadInputError("method 'noop' needs a learned noise: load a NoOp checkpoint or bundle")
        if loss == self.info.loss and self.runner.has(CLASSIFIER) and self.classifier_fits_classes():
            feeds_emb = {"class_embeddings": self.emb} if self.custom_classes else {}
            return np.concatenate([self._finite(CLASSIFIER, self.runner.run(CLASSIFIER, {"image": chunk, **feeds_emb},
                                                                            ["errors"])[0])
                                   for chunk in self._chunks(images, self.images_per_call())])
        z0 = self.encode(images)
        eps = self.noise(z0)
        t = np.full(len(z0), self.info.t_star, dtype=np.int64)
        return self.class_errors(z0, eps, t, None, loss)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self._finite(ENCODER, self.runner.run(ENCODER, {"image": chunk}, ["z0"])[0])
                               for chunk in self._chunks(images, self.images_per_call())])

    def noise(self, z0: np.ndarray) -> np.ndarray:
        return np.concatenate([self._finite(NOISE, self.runner.run(NOISE, {"z0": chunk}, ["eps"])[0])
                               for chunk in self._chunks(z0, self.images_per_call())])

    def class_errors(self, z0: np.ndarray, eps: np.ndarray, t: np.ndarray, classes: np.ndarray | None, loss: str,
                     progress: Progress = None) -> np.ndarray:
        if loss not in self.info.scorer_losses:
            raise BadInputError(f"this bundle's scorer graph has no {loss} output "
                                f"(it has {', '.join(self.info.scorer_losses)})")
        emb = self.emb if classes is None else self.emb[np.asarray(classes)]
        k = emb.shape[0]
        if k > self.info.max_batch:  # one row's classes do not fit one call: split the classes
            step = self.info.max_batch
            return np.concatenate([self.class_errors(z0, eps, t, (np.arange(self.num_classes) if classes is None
                                                                  else np.asarray(classes))[j:j + step], loss,
                                                     progress) for j in range(0, k, step)], axis=1)
        rows = max(1, self.info.max_batch // k)
        out = []
        for i in range(0, len(z0), rows):
            feeds = {"z0": np.ascontiguousarray(z0[i:i + rows], dtype=np.float32),
                     "eps": np.ascontiguousarray(eps[i:i + rows], dtype=np.float32),
                     "timestep": np.asarray(t[i:i + rows], dtype=np.float32), "class_embeddings": emb}
            out.append(self._finite(SCORER, self.runner.run(SCORER, feeds, [error_output(loss)])[0]))
            if progress is not None:
                progress(len(feeds["z0"]) * k)
        return np.concatenate(out)

    # ------------------------------------------------------------------------------------------ prompts
    @property
    def can_embed(self) -> bool:
        """Whether new prompts can be embedded: a bundle exported with --no-text-encoder ships none."""
        return self.tokenize is not None and self.runner.has(TEXT_ENCODER)

    def embed(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings (N, L, D) float32 of prompts through the text-encoder graph."""
        if not self.can_embed:
            raise BadInputError(f"{self.info.name} has no text encoder (exported with --no-text-encoder), so it "
                                "cannot embed new prompts; re-export it without --no-text-encoder")
        ids = self.tokenize(prompts)
        return np.concatenate([self._finite(TEXT_ENCODER, self.runner.run(TEXT_ENCODER, {"input_ids": ids[i:i + 64]},
                                                                          ["last_hidden_state"])[0])
                               for i in range(0, len(ids), 64)])

    def _finite(self, graph: str, values: np.ndarray) -> np.ndarray:
        """Refuse NaN/Inf from a graph: scores computed from them would be silently wrong."""
        if not np.isfinite(values).all():
            hint = (" (fp16 overflow? re-export with --fp32: noop-rt export --ckpt NAME.pt --fp32)"
                    if self.info.precision == "fp16" else "")
            raise NonFiniteError(f"the {graph} graph produced NaN or infinite values on the {self.runner.name} "
                                 f"backend{hint}")
        return values

    @staticmethod
    def _chunks(x: np.ndarray, size: int) -> list[np.ndarray]:
        return [np.ascontiguousarray(x[i:i + size], dtype=np.float32) for i in range(0, len(x), size)]
