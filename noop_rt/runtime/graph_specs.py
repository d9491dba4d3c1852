"""One description per bundle graph (as NVIDIA's diffusion demo does): tensor names, shapes with named dynamic
axes, dtypes. The same descriptions drive ONNX export, the manifest, every backend's feeds, and TensorRT's
optimisation profiles. Pure data: no torch.

Every float input and output is float32 in every precision (an fp16 bundle casts inside its graphs), so the host
side never changes with the precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CLASSIFIER, SCORER, ENCODER, NOISE, TEXT_ENCODER = "classifier", "scorer", "vae_encoder", "noise", "text_encoder"
GRAPH_NAMES = (CLASSIFIER, SCORER, ENCODER, NOISE, TEXT_ENCODER)
BATCH, CLASSES, PROMPTS = "batch", "classes", "prompts"  # dynamic axes: images or rows; classes; prompts
# inputs that may be left out: the classifier's class embeddings default to the trained classes'
OPTIONAL_INPUTS = frozenset({(CLASSIFIER, "class_embeddings")})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a named dynamic axis
    dtype: str  # "float32" | "int64"

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else int(d) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def profile(self, ranges: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimisation profile: per input, (min, opt, max) shapes from per-axis (min, opt, max)."""
        return {t.name: tuple(t.concrete({d: r[i] for d, r in ranges.items()}) for i in range(3))  # type: ignore
                for t in self.inputs}

    def to_json(self, file: str | None = None) -> dict[str, Any]:
        return {"file": file or self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return cls(name, tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_json(t) for t in d["outputs"]))


def error_output(loss: str) -> str:
    """The scorer graph's output holding the `loss` errors."""
    return f"errors_{loss}"


def graph_specs(latent_shape: tuple[int, int, int], resolution: int, max_tokens: int, text_dim: int,
                losses: tuple[str, ...], token_ids: int | None = None) -> dict[str, GraphSpec]:
    """The graphs of a bundle. `classifier`: the whole NoOp pass (its class embeddings input defaults to the
    bundle's own); `scorer`: class errors of (z0, eps, t) rows, one output per error norm. `max_tokens` is the class
    embeddings' length and `token_ids` the text encoder's input length (None: the same; SDXL/SD3 differ: their
    token ids are every tokenizer's, their class embeddings end with the pooled embedding)."""
    f, i64 = "float32", "int64"
    c, h, w = latent_shape
    z = (BATCH, c, h, w)
    emb = TensorSpec("class_embeddings", (CLASSES, max_tokens, text_dim), f)
    image = TensorSpec("image", (BATCH, 3, resolution, resolution), f)
    return {
        CLASSIFIER: GraphSpec(CLASSIFIER, (image, emb),
                              (TensorSpec("errors", (BATCH, CLASSES), f), TensorSpec("probs", (BATCH, CLASSES), f))),
        SCORER: GraphSpec(SCORER, (TensorSpec("z0", z, f), TensorSpec("eps", z, f),
                                   TensorSpec("timestep", (BATCH,), f), emb),
                          tuple(TensorSpec(error_output(loss), (BATCH, CLASSES), f) for loss in losses)),
        ENCODER: GraphSpec(ENCODER, (image,), (TensorSpec("z0", z, f),)),
        NOISE: GraphSpec(NOISE, (TensorSpec("z0", z, f),), (TensorSpec("eps", z, f),)),
        TEXT_ENCODER: GraphSpec(TEXT_ENCODER, (TensorSpec("input_ids", (PROMPTS, token_ids or max_tokens), i64),),
                                (TensorSpec("last_hidden_state", (PROMPTS, max_tokens, text_dim), f),)),
    }
