"""Text conditioning and denoiser calls of the SDXL and SD3 families, as torch modules that keep the interface of an
SD 1.x/2.x backbone: token ids in, class embeddings (N, L, D) out; `denoiser(sample, timestep,
encoder_hidden_states=emb)` like a UNet2DConditionModel.

What a class is conditioned on, beyond SD 1.x/2.x's hidden states, is its POOLED text embedding (SDXL: the projected
output of the second CLIP encoder; SD3: both CLIP projections concatenated). It travels as one more row of the class
embeddings, zero-padded to their width: class embeddings (N, L + 1, D) = [prompt embeddings (N, L, D); pooled
(N, 1, P) | zeros (D - P)]. So every path that caches, feeds or bakes class embeddings (checkpoints,
`class_embeddings.npy`, the classifier graph's constants, the scorer's input) carries the pooled embedding with them
unchanged; the denoiser splits it off again (`split_pooled`).

Token ids are the concatenation of each tokenizer's padded ids (`tokenizer`, `tokenizer_2`[, `tokenizer_3`]), each to
its own length, as each pipeline's `encode_prompt` tokenizes.

- SDXL (`StableDiffusionXLPipeline.encode_prompt`): prompt embeddings = the penultimate hidden states of both CLIP
  encoders concatenated along the width; pooled = `text_encoder_2`'s projected output (`text_embeds`). The UNet's
  `text_time` added conditioning takes the pooled embedding and the six time ids (original size, crop top-left,
  target size), which `_get_add_time_ids` builds from the generated resolution: here the model's input resolution,
  no crop, (H, W, 0, 0, H, W), held as a buffer (a constant of every exported graph).
- SD3 (`StableDiffusion3Pipeline.encode_prompt`): the two CLIP penultimate hidden states concatenated, zero-padded to
  T5's width, then T5's last hidden state appended along the sequence; pooled = both CLIP projections concatenated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def pack_pooled(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(N, L, D) and (N, P) with P <= D -> class embeddings (N, L + 1, D), the pooled vector zero-padded as the last
    row."""
    width = prompt_embeds.shape[-1]
    row = F.pad(pooled, (0, width - pooled.shape[-1])).unsqueeze(1)
    return torch.cat([prompt_embeds, row.to(prompt_embeds.dtype)], dim=1)


def split_pooled(emb: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class embeddings (N, L + 1, D) -> prompt embeddings (N, L, D), pooled (N, P)."""
    return emb[:, :-1], emb[:, -1, :pooled_dim]


class ClipLastHidden(nn.Module):
    """SD 1.x/2.x: token ids (N, L) -> the CLIP text encoder's last hidden state (N, L, D)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


def _penultimate_and_pooled(encoder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


class SdxlText(nn.Module):
    """SDXL: ids (N, L1 + L2) of `tokenizer` and `tokenizer_2` -> class embeddings (N, L + 1, D1 + D2) (L1 == L2)."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module, length: int) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.length = int(length)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids1, ids2 = input_ids[:, :self.length], input_ids[:, self.length:]
        hidden1 = self.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        hidden2, pooled = _penultimate_and_pooled(self.text_encoder_2, ids2)
        return pack_pooled(torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1), pooled)


class Sd3Text(nn.Module):
    """SD3: ids (N, L1 + L2 + L3) of `tokenizer`, `tokenizer_2`, `tokenizer_3` -> class embeddings
    (N, L1 + L3 + 1, D_T5) (L1 == L2). Without a T5 encoder (`text_encoder_3` None in model_index.json) the T5 part is
    zeros, as the pipeline does."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module | None, lengths: tuple[int, int, int],
                 width: int) -> None:
        super().__init__()
        self.text_encoder = clip_l
        self.text_encoder_2 = clip_g
        self.text_encoder_3 = t5
        self.lengths = tuple(int(x) for x in lengths)
        self.width = int(width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        l1, l2, _ = self.lengths
        ids1, ids2, ids3 = input_ids[:, :l1], input_ids[:, l1:l1 + l2], input_ids[:, l1 + l2:]
        hidden1, pooled1 = _penultimate_and_pooled(self.text_encoder, ids1)
        hidden2, pooled2 = _penultimate_and_pooled(self.text_encoder_2, ids2)
        clip = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
        clip = F.pad(clip, (0, self.width - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = torch.zeros((ids3.shape[0], ids3.shape[1], self.width), dtype=clip.dtype, device=clip.device)
        else:
            t5 = self.text_encoder_3(ids3)[0].to(clip.dtype)
        return pack_pooled(torch.cat([clip, t5], dim=-2), torch.cat([pooled1, pooled2.to(pooled1.dtype)], dim=-1))


class Denoiser(nn.Module):
    """A diffusers denoising network behind the UNet2DConditionModel call `(sample, timestep,
    encoder_hidden_states=class embeddings, return_dict=False) -> (prediction,)`; `config` is the network's."""

    def __init__(self, net: nn.Module, pooled_dim: int) -> None:
        super().__init__()
        self.net = net
        self.pooled_dim = int(pooled_dim)

    @property
    def config(self) -> Any:  # the diffusers network's FrozenDict
        return self.net.config

    def enable_gradient_checkpointing(self) -> None:
        self.net.enable_gradient_checkpointing()


class SdxlDenoiser(Denoiser):
    """SDXL's UNet with its `text_time` added conditioning: the pooled row of the class embeddings and the time ids
    (H, W, 0, 0, H, W) of the input resolution."""

    def __init__(self, unet: nn.Module, pooled_dim: int, resolution: int) -> None:
        super().__init__(unet, pooled_dim)
        size = float(resolution)
        self.register_buffer("time_ids", torch.tensor([size, size, 0.0, 0.0, size, size]), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        hidden, pooled = split_pooled(encoder_hidden_states, self.pooled_dim)
        time_ids = self.time_ids.to(hidden.dtype).expand(sample.shape[0], 6)
        out = self.net(sample, timestep, encoder_hidden_states=hidden,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
        return (out,)


class Sd3Denoiser(Denoiser):
    """SD3's SD3Transformer2DModel: `timestep` is the model's own timestep (sigma x num_train_timesteps, as
    FlowMatchEulerDiscreteScheduler.timesteps); the output is the velocity v = eps - x0."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        hidden, pooled = split_pooled(encoder_hidden_states, self.pooled_dim)
        out = self.net(hidden_states=sample, timestep=timestep, encoder_hidden_states=hidden,
                       pooled_projections=pooled, return_dict=False)[0]
        return (out,)
