"""One description per graph (as NVIDIA's diffusion demo does): names, shapes with a symbolic batch, dtypes.

The same descriptions drive ONNX export (input/output names, dynamic axes, sample inputs), the onnxruntime feeds,
and the TensorRT optimisation profiles ([min, opt, max] batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BATCH = "batch"
GRAPH_NAMES = ("vae_encoder", "noise", "unet", "text_encoder")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # "batch" marks the dynamic axis
    dtype: str  # "float32" | "float16" | "int64"

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: BATCH for i, d in enumerate(t.shape) if d == BATCH} for t in self.inputs + self.outputs}

    def sample_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        out = []
        for t in self.inputs:
            if t.dtype == "int64":
                out.append(torch.zeros(t.concrete(batch), dtype=torch.int64))
            else:
                out.append(torch.randn(t.concrete(batch), dtype=getattr(torch, t.dtype)))
        return tuple(out)

    def profile(self, opt: int, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimisation profile: per input, (min, opt, max) shapes over the batch axis."""
        opt = max(1, min(opt, max_batch))
        return {t.name: (t.concrete(1), t.concrete(opt), t.concrete(max_batch)) for t in self.inputs}

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return cls(name, tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_json(t) for t in d["outputs"]))


def graph_specs(latent_shape: tuple[int, int, int], resolution: int, max_tokens: int, text_dim: int,
                precision: str) -> dict[str, GraphSpec]:
    """The four graphs of a bundle. Timestep stays float32 and token ids int64 in every precision."""
    f = "float16" if precision == "fp16" else "float32"
    c, h, w = latent_shape
    z = (BATCH, c, h, w)
    return {
        "vae_encoder": GraphSpec("vae_encoder", (TensorSpec("image", (BATCH, 3, resolution, resolution), f),),
                                 (TensorSpec("z0", z, f),)),
        "noise": GraphSpec("noise", (TensorSpec("z0", z, f),), (TensorSpec("eps", z, f),)),
        "unet": GraphSpec("unet", (TensorSpec("sample", z, f), TensorSpec("timestep", (BATCH,), "float32"),
                                   TensorSpec("encoder_hidden_states", (BATCH, max_tokens, text_dim), f)),
                          (TensorSpec("out_sample", z, f),)),
        "text_encoder": GraphSpec("text_encoder", (TensorSpec("input_ids", (BATCH, max_tokens), "int64"),),
                                  (TensorSpec("last_hidden_state", (BATCH, max_tokens, text_dim), f),)),
    }


class UNetGraph(nn.Module):
    """unet(sample, timestep, encoder_hidden_states).sample — the raw model output (eps or v)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class TextEncoderGraph(nn.Module):
    """The text encoder's last hidden state for token ids (SD conditions on it)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]
