"""Architecture configs built in code: the demo model and tiny SD models for tests (the real architectures' shapes,
for benchmarks, are in `noop_rt/build/shape_fixtures.py`).

Each returns plain diffusers/transformers config objects or dicts; `random_components` instantiates them with
random weights (latency does not depend on the weights; tests only need the architecture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMMON_WORDS = ("a", "an", "the", "photo", "of", "picture", "handwritten", "digit", "type", "pet", "cat", "dog")


@dataclass(frozen=True)
class Architecture:
    """One model family: UNet/VAE/text-encoder configs plus the tokenizer length and noise schedule."""

    name: str
    unet: dict[str, Any]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ffn: int
    max_tokens: int  # tokenizer model_max_length == text encoder positions
    vocab_size: int | None  # None: the size of the locally built vocabulary
    vae: dict[str, Any] | None  # None: pixel-space model (z0 = image)
    scheduler: dict[str, Any]


def _cross_attn_unet(
    sample_size: int, channels: int, blocks: tuple[int, ...], cross_dim: int, heads: int | tuple[int, ...],
    groups: int, layers: int = 2, first_plain: bool = True,
) -> dict[str, Any]:
    n = len(blocks)
    down = ["CrossAttnDownBlock2D"] * n
    up = ["CrossAttnUpBlock2D"] * n
    if first_plain:  # the highest-resolution block without attention, as in small pixel UNets
        down[0] = "DownBlock2D"
        up[-1] = "UpBlock2D"
    return {
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": list(blocks),
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "norm_num_groups": groups,
    }


DDPM_LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
               "prediction_type": "epsilon", "clip_sample": False}
SD_SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}

# The built-in demo: a 1-channel 16x16 pixel-space UNet2DConditionModel, cross-attention on a tiny CLIP text model.
DEMO = Architecture(
    name="demo",
    unet=_cross_attn_unet(16, 1, (48, 96, 96), cross_dim=64, heads=4, groups=16, layers=1),
    text_hidden=64, text_layers=2, text_heads=4, text_ffn=128, max_tokens=8, vocab_size=None,
    vae=None, scheduler=DDPM_LINEAR,
)

# Tiny latent SD (tests): 32 px image -> 4x16x16 latent through a real AutoencoderKL.
TINY_SD = Architecture(
    name="tiny-sd",
    unet=_cross_attn_unet(16, 4, (16, 32), cross_dim=32, heads=2, groups=8, layers=1, first_plain=False),
    text_hidden=32, text_layers=2, text_heads=2, text_ffn=64, max_tokens=16, vocab_size=None,
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
         "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
         "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32},
    scheduler=SD_SCALED_LINEAR,
)

ARCHITECTURES = {a.name: a for a in (DEMO, TINY_SD)}
