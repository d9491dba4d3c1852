"""Load a diffusion backbone: a local diffusers Stable Diffusion 1.x/2.x folder, or the built-in pixel demo.

`Backbone` holds the frozen networks: `encode` (image -> z0), `embed` (prompts -> text embeddings), and
`class_errors` (the scoring module of `scorer.py` over its UNet). Images are RGB in [-1, 1] at `resolution`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from noop_rt.errors import BackboneError
from noop_rt.scorer import ClassErrors

DEMO_SOURCE = "demo"

_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors"),
}


class PixelEncoder(nn.Module):
    """z0 of a pixel-space model: the RGB image itself, or its grey level for a 1-channel model."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise BackboneError(f"a pixel-space UNet must have 1 or 3 input channels, not {channels}")
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, c, H, W)
        return image.mean(dim=1, keepdim=True) if self.channels == 1 else image


class VaeEncoderMean(nn.Module):
    """z0 of a latent model: `vae.encode(x).latent_dist.mean * scaling_factor` (never a sample)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 4, H/f, W/f)
        return self.vae.encode(image).latent_dist.mean * self.scale


@dataclass
class Backbone:
    """A frozen text-conditioned diffusion model, ready to score."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    encoder: nn.Module  # image (B, 3, H, W) in [-1, 1] -> z0
    alphas_cumprod: torch.Tensor  # (T,) float32, on CPU
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int
    source: str  # "demo" or the folder path
    kind: str  # "latent" | "pixel"
    max_tokens: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (C, L), padded to the text encoder's length as Stable Diffusion does."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (C, L, D) in float32: the text encoder's last hidden state."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0].float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z0 (B, c, h, w) float32 from RGB images (B, 3, H, W) in [-1, 1]."""
        return self.encoder(images.to(self.device, self.dtype)).float()

    def class_errors(self, losses: tuple[str, ...] = ("l2",)) -> ClassErrors:
        """The scoring module (noising, class broadcast, UNet, v->eps, error norms) over this backbone's UNet."""
        return ClassErrors(self.unet, self.alphas_cumprod, self.prediction_type, losses).to(self.device)

    def requires_grad_(self, flag: bool) -> Backbone:
        for module in (self.unet, self.text_encoder, self.encoder):
            module.requires_grad_(flag)
        return self


def _missing_files(root: Path, pixel: bool) -> list[str]:
    missing = []
    for part in ("unet", "text_encoder") + (() if pixel else ("vae",)):
        if not (root / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
        if not any((root / part / name).is_file() for name in _WEIGHTS[part]):
            missing.append(f"{part}/{_WEIGHTS[part][0]}")
    tok = root / "tokenizer"
    bpe_files = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    if not (tok / "tokenizer.json").is_file() and not bpe_files:
        missing.append("tokenizer/vocab.json+merges.txt (or tokenizer/tokenizer.json)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    return missing


def quiet_libraries() -> None:
    """Keep diffusers/transformers from printing load progress and advice on stderr (our logs live there)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_source(model: str | Path | None) -> Path:
    """The folder of a model argument: None/"demo" is the built-in demo."""
    if model is None or str(model) == DEMO_SOURCE:
        from noop_rt.demo import MODEL_DIR

        return MODEL_DIR
    return Path(model).expanduser()


def load_backbone(model: str | Path | None = DEMO_SOURCE, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Backbone:
    """Load a diffusers Stable Diffusion folder (or the demo) for scoring; raises BackboneError naming what is wrong."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    root = resolve_source(model)
    source = DEMO_SOURCE if model is None or str(model) == DEMO_SOURCE else str(root.resolve())  # ckpts store it
    if not root.is_dir():
        raise BackboneError(f"model folder not found: {root}")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise BackboneError(f"{root} is not a diffusers Stable Diffusion folder: model_index.json is missing")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneError(f"{index_path} is not valid JSON: {exc}") from None
    pixel = "vae" not in index
    missing = _missing_files(root, pixel)
    if missing:
        raise BackboneError(f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")
    device = torch.device(device)
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        vae = None if pixel else AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(f"cannot load the model in {root}: {first}") from None
    if pixel:
        encoder: nn.Module = PixelEncoder(int(unet.config.in_channels))
        resolution = int(unet.config.sample_size)
    else:
        encoder = VaeEncoderMean(vae)
        resolution = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    prediction_type = str(scheduler.config.prediction_type)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise BackboneError(f"unsupported prediction_type {prediction_type!r} in {root}/scheduler "
                            "(epsilon and v_prediction are supported)")
    max_tokens = int(getattr(text_encoder.config, "max_position_embeddings", tokenizer.model_max_length))
    max_tokens = min(max_tokens, int(tokenizer.model_max_length))
    backbone = Backbone(
        unet=unet.to(device).eval(), text_encoder=text_encoder.to(device).eval(), tokenizer=tokenizer,
        encoder=encoder.to(device).eval(), alphas_cumprod=scheduler.alphas_cumprod.float().clone(),
        prediction_type=prediction_type, resolution=resolution, source=source, kind="pixel" if pixel else "latent",
        max_tokens=max_tokens, dtype=dtype, device=device,
    )
    return backbone.requires_grad_(False)
