"""Architecture configs built in code: the demo model and tiny SD models for tests (the real architectures' shapes,
for benchmarks, are in `noop_rt/build/shape_fixtures.py`).

Each returns plain diffusers/transformers config objects or dicts; `random_components` instantiates them with
random weights (latency does not depend on the weights; tests only need the architecture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from noop_rt.demo import DIGIT_NAMES
from noop_rt.train.vocab import build_clip_tokenizer

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



@dataclass
class Components:
    """The parts of a Stable-Diffusion-style model, as `save_pretrained` folders hold them."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vae: AutoencoderKL | None
    scheduler: DDPMScheduler


def build_tokenizer(arch: Architecture, extra_words: tuple[str, ...] = ()) -> CLIPTokenizer:
    return build_clip_tokenizer(COMMON_WORDS + DIGIT_NAMES + extra_words, arch.max_tokens)


def random_components(arch: Architecture, seed: int = 0, extra_words: tuple[str, ...] = ()) -> Components:
    """Instantiate `arch` with seeded random weights."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(arch, extra_words)
    vocab_size = arch.vocab_size or len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=arch.text_ffn,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_tokens, projection_dim=arch.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Components(
        unet=UNet2DConditionModel(**arch.unet),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        vae=AutoencoderKL(**arch.vae) if arch.vae is not None else None,
        scheduler=DDPMScheduler(**arch.scheduler),
    )


def save_components(components: Components, folder: str) -> None:
    """Write the diffusers folder layout (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/, vae/)."""
    import json
    from pathlib import Path

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(root / "unet")
    components.text_encoder.save_pretrained(root / "text_encoder")
    components.tokenizer.save_pretrained(root / "tokenizer")
    components.scheduler.save_pretrained(root / "scheduler")
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline" if components.vae is not None else "NoopPixelDiffusion",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if components.vae is not None:
        components.vae.save_pretrained(root / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- SDXL and SD3 (tests)
_TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
             "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32}
TINY_TEXT_TOKENS = 16


def _clip_config(tokenizer: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_TEXT_TOKENS,
                          projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _clip_pair(extra_words: tuple[str, ...]) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """`tokenizer` (pads with its end token) and `tokenizer_2` (pads with "!", as SDXL's and SD3's second)."""
    words = COMMON_WORDS + DIGIT_NAMES + extra_words
    first = build_clip_tokenizer(words, TINY_TEXT_TOKENS)
    second = build_clip_tokenizer(words, TINY_TEXT_TOKENS)
    second.pad_token = "!"
    return first, second


def tiny_sdxl_pipeline(seed: int = 0, extra_words: tuple[str, ...] = ()) -> Any:
    """A StableDiffusionXLPipeline of random tiny networks: 32 px images, 4x16x16 latents, CLIP widths 16 + 24
    (projection 24), UNet with `text_time` added conditioning (6 time ids x 8 + 24 = 72 inputs)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2 = _clip_pair(extra_words)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=72,
        cross_attention_dim=40, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**_TINY_VAE), text_encoder=CLIPTextModel(_clip_config(tok1, 16, 16)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok2, 24, 24)), tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler)


def build_t5_tokenizer(words: tuple[str, ...], model_max_length: int) -> Any:
    """A T5 (sentencepiece-unigram style) fast tokenizer built offline: <pad> 0, </s> 1, <unk> 2, whole words with
    the "▁" word-start marker, single letters and digits as fallback; "</s>" appended to each prompt as T5 does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in sorted({w.lower() for w in words if w})]
    pieces += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


def tiny_sd3_pipeline(seed: int = 0, extra_words: tuple[str, ...] = (), shift: float = 3.0) -> Any:
    """A StableDiffusion3Pipeline of random tiny networks: 32 px images, 4x16x16 latents (VAE with SD3's shift and
    scaling factors), CLIP-L/CLIP-G widths 8 + 16 (projections 8 + 16 = pooled 24), T5 width 32 = the transformer's
    joint_attention_dim, FlowMatchEulerDiscreteScheduler with `shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok1, tok2 = _clip_pair(extra_words)
    tok3 = build_t5_tokenizer(COMMON_WORDS + DIGIT_NAMES + extra_words, 12)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=24, out_channels=4,
                                        pos_embed_max_size=16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1))
    vae = AutoencoderKL(**_TINY_VAE, shift_factor=0.0609, scaling_factor=1.5305)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_config(tok1, 8, 8)), tokenizer=tok1,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok2, 16, 16)), tokenizer_2=tok2,
        text_encoder_3=t5, tokenizer_3=tok3)
