"""Which backbone a diffusers folder holds (`model_index.json`'s `_class_name` and components), and the loaders of the
SDXL and SD3 families (SD 1.x/2.x load in `train/backbones.py`). Each returns a `Backbone` whose UNet call, text
conditioning and noise schedule follow its pipeline (`train/conditioning.py`, `train/diffusion_error.py`), so
training, the torch backend and `export` run them unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noop_rt.runtime.errors import BackboneError
from noop_rt.train.backbones import Backbone, VaeEncoderMean
from noop_rt.train.conditioning import Sd3Denoiser, Sd3Text, SdxlDenoiser, SdxlText
from noop_rt.train.diffusion_error import FLOW_MATCHING

SD, SDXL, SD3 = "sd", "sdxl", "sd3"
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
SUPPORTED = ("StableDiffusionPipeline (SD 1.x/2.x, UNet2DConditionModel + one CLIP text encoder), "
             "StableDiffusionXLPipeline (SDXL) and StableDiffusion3Pipeline (SD3, SD3.5)")
T5_MAX_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length

_MODEL = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
          "diffusion_pytorch_model.fp16.safetensors")
_TEXT = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "model.safetensors.index.json",
         "model.fp16.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_NET = (*_MODEL, "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.fp16.safetensors.index.json")


def family_of(index: dict[str, Any], root: Path) -> str:
    """"sd" | "sdxl" | "sd3" for a model_index.json; BackboneError naming what was found and what is supported."""
    name = str(index.get("_class_name", "?"))
    if name in SDXL_PIPELINES or ("unet" in index and "text_encoder_2" in index and "transformer" not in index):
        return SDXL
    if name in SD3_PIPELINES:
        return SD3
    if "unet" in index and "transformer" not in index and "text_encoder" in index:
        return SD
    raise BackboneError(f"{root} holds a {name} (model_index.json), which noop-rt does not run; supported: "
                        f"{SUPPORTED}")


def missing_parts(root: Path, index: dict[str, Any], family: str) -> list[str]:
    """The files an SDXL/SD3 folder lacks (config and weights of each network, tokenizer files, scheduler)."""
    nets = {SDXL: ("unet", "vae", "text_encoder", "text_encoder_2"),
            SD3: ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}[family]
    toks = {SDXL: ("tokenizer", "tokenizer_2"), SD3: ("tokenizer", "tokenizer_2", "tokenizer_3")}[family]
    missing = []
    for part in nets:
        if part == "text_encoder_3" and not _present(index, part):
            continue  # SD3 runs without T5 (the pipeline's zeros), as `text_encoder_3: [null, null]` says
        names = _TEXT if part.startswith("text_encoder") else _NET
        if not (root / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
        if not any((root / part / n).is_file() for n in names):
            missing.append(f"{part}/{names[0]}")
    for part in toks:
        if part == "tokenizer_3" and not _present(index, "text_encoder_3"):
            continue
        folder = root / part
        if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file() \
                and not (folder / "spiece.model").is_file():
            missing.append(f"{part}/tokenizer.json")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    return missing


def _present(index: dict[str, Any], part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _text_length(tokenizer: Any, encoder: Any, cap: int | None = None) -> int:
    n = int(tokenizer.model_max_length)
    n = min(n, int(getattr(encoder.config, "max_position_embeddings", n) or n)) if encoder is not None else n
    return min(n, cap) if cap else n


def _vae(root: Path, dtype: torch.dtype) -> tuple[Any, int]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    return vae, 2 ** (len(vae.config.block_out_channels) - 1)


def _fail(root: Path, exc: BaseException) -> BackboneError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BackboneError(f"cannot load the model in {root}: {first}")


def load_sdxl(root: Path, source: str, dtype: torch.dtype, device: torch.device) -> Backbone:
    """A StableDiffusionXLPipeline folder: UNet with `text_time` added conditioning, CLIPTextModel +
    CLIPTextModelWithProjection, their tokenizers, the DDPM noise schedule of its scheduler config."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
        text1 = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype)
        text2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=dtype)
        tok1 = CLIPTokenizer.from_pretrained(root / "tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        vae, factor = _vae(root, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _fail(root, exc) from None
    if unet.config.addition_embed_type != "text_time":
        raise BackboneError(f"{root}/unet has addition_embed_type {unet.config.addition_embed_type!r}; an SDXL UNet "
                            "has 'text_time'")
    width = int(text1.config.hidden_size) + int(text2.config.hidden_size)
    pooled = int(text2.config.projection_dim)
    if width != int(unet.config.cross_attention_dim):
        raise BackboneError(f"{root}: the text encoders' widths add up to {width}, the UNet's cross_attention_dim is "
                            f"{unet.config.cross_attention_dim}")
    if pooled > width:
        raise BackboneError(f"{root}: text_encoder_2's projection_dim {pooled} exceeds the prompt embeddings' width "
                            f"{width}")
    prediction_type = str(scheduler.config.prediction_type)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise BackboneError(f"unsupported prediction_type {prediction_type!r} in {root}/scheduler "
                            "(epsilon and v_prediction are supported)")
    n1, n2 = _text_length(tok1, text1), _text_length(tok2, text2)
    if n1 != n2:
        raise BackboneError(f"{root}: tokenizer and tokenizer_2 pad to {n1} and {n2} tokens; SDXL needs one length")
    resolution = int(unet.config.sample_size) * factor
    denoiser = SdxlDenoiser(unet, pooled, resolution)
    conditioner = SdxlText(text1, text2, n1)
    return Backbone(
        unet=denoiser.to(device).eval(), text_encoder=text1.to(device).eval(), tokenizer=tok1,
        encoder=VaeEncoderMean(vae).to(device).eval(), alphas_cumprod=scheduler.alphas_cumprod.float().clone(),
        prediction_type=prediction_type, resolution=resolution, source=source, kind="latent", max_tokens=n1 + 1,
        dtype=dtype, device=device, family=SDXL, conditioner=conditioner.to(device).eval(),
        tokenizers=(("tokenizer", tok1, n1), ("tokenizer_2", tok2, n2)), cond_dim=width,
    )


def flow_sigmas(scheduler: Any) -> torch.Tensor:
    """sigma of each timestep index t = 0..T-1, increasing: FlowMatchEulerDiscreteScheduler's training sigmas
    shift * s / (1 + (shift - 1) * s) of s = (t + 1) / T, read from the scheduler itself."""
    return torch.flip(scheduler.sigmas.float(), dims=(0,)).clone()


def load_sd3(root: Path, index: dict[str, Any], source: str, dtype: torch.dtype, device: torch.device) -> Backbone:
    """A StableDiffusion3Pipeline folder: SD3Transformer2DModel, CLIP-L and CLIP-G with projection, T5 (optional),
    FlowMatchEulerDiscreteScheduler with its shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    has_t5 = _present(index, "text_encoder_3")
    try:
        net = SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
        text1 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", dtype=dtype)
        text2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=dtype)
        text3 = T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=dtype) if has_t5 else None
        tok1 = CLIPTokenizer.from_pretrained(root / "tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
        tok3 = AutoTokenizer.from_pretrained(root / "tokenizer_3") if has_t5 else None
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        vae, factor = _vae(root, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _fail(root, exc) from None
    if scheduler.config.get("use_dynamic_shifting"):
        raise BackboneError(f"{root}/scheduler uses dynamic (resolution-dependent) shifting, which noop-rt does not "
                            "run; a static `shift` is supported")
    width = int(net.config.joint_attention_dim)
    clip_width = int(text1.config.hidden_size) + int(text2.config.hidden_size)
    pooled = int(text1.config.projection_dim) + int(text2.config.projection_dim)
    if pooled != int(net.config.pooled_projection_dim):
        raise BackboneError(f"{root}: the CLIP projections add up to {pooled}, the transformer's "
                            f"pooled_projection_dim is {net.config.pooled_projection_dim}")
    if clip_width > width or pooled > width:
        raise BackboneError(f"{root}: the CLIP embeddings ({clip_width}, pooled {pooled}) are wider than the "
                            f"transformer's joint_attention_dim {width}")
    if text3 is not None and int(text3.config.d_model) != width:
        raise BackboneError(f"{root}: T5's d_model {text3.config.d_model} is not the transformer's "
                            f"joint_attention_dim {width}")
    n1, n2 = _text_length(tok1, text1), _text_length(tok2, text2)
    if n1 != n2:
        raise BackboneError(f"{root}: tokenizer and tokenizer_2 pad to {n1} and {n2} tokens; SD3 needs one length")
    n3 = _text_length(tok3, None, T5_MAX_TOKENS) if tok3 is not None else T5_MAX_TOKENS
    tokenizers = (("tokenizer", tok1, n1), ("tokenizer_2", tok2, n2))
    if tok3 is not None:
        tokenizers += (("tokenizer_3", tok3, n3),)
    conditioner = _Sd3NoT5(text1, text2, (n1, n2, n3), width) if text3 is None else \
        Sd3Text(text1, text2, text3, (n1, n2, n3), width)
    sigmas = flow_sigmas(scheduler)
    snr_abar = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas ** 2)  # the DDPM abar of the same signal-to-noise ratio
    return Backbone(
        unet=Sd3Denoiser(net, pooled).to(device).eval(), text_encoder=text1.to(device).eval(), tokenizer=tok1,
        encoder=VaeEncoderMean(vae).to(device).eval(), alphas_cumprod=snr_abar, prediction_type=FLOW_MATCHING,
        resolution=int(net.config.sample_size) * factor, source=source, kind="latent", max_tokens=n1 + n3 + 1,
        dtype=dtype, device=device, family=SD3, conditioner=conditioner.to(device).eval(), tokenizers=tokenizers,
        sigmas=sigmas, cond_dim=width,
    )


class _Sd3NoT5(Sd3Text):
    """SD3 without its T5 encoder: the T5 part of the prompt embeddings is zeros of the pipeline's length, and the
    token ids hold the two CLIP tokenizations only."""

    def __init__(self, clip_l: torch.nn.Module, clip_g: torch.nn.Module, lengths: tuple[int, int, int],
                 width: int) -> None:
        super().__init__(clip_l, clip_g, None, lengths, width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros((input_ids.shape[0], self.lengths[2]), dtype=input_ids.dtype, device=input_ids.device)
        return super().forward(torch.cat([input_ids, pad], dim=1))
