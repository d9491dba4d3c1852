"""Load a diffusion backbone: a local diffusers Stable Diffusion 1.x/2.x folder, or the built-in pixel demo, with
an optional LoRA fused into it.

`Backbone` holds the frozen networks: `encode` (image -> z0), `embed` (prompts -> text embeddings), and
`class_errors` (the diffusion-error module of `train/diffusion_error.py` over its UNet). Images are RGB in [-1, 1] at
`resolution`.

LoRA (`load_backbone(..., lora=FILE)`): a LoRA `.safetensors` for Stable Diffusion (diffusers format, `unet.*` /
`text_encoder.*` keys, or kohya/A1111 `lora_unet_*` / `lora_te_*` keys with their alphas) is read with diffusers'
own loader (`StableDiffusionLoraLoaderMixin.lora_state_dict`, `UNet2DConditionModel.load_lora_adapter`, via peft),
MERGED into the weights (W += scale * alpha/r * B A) and the adapter layers removed: the UNet (and text encoder, if
the file adapts it) are plain diffusers/transformers modules again, so training, the torch backend and `export`
(which then bakes the merged weights into the graphs) all run the adapted model. `Backbone.lora` records the file,
its sha256, the scale and the number of merged layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from noop_rt.runtime.bundle import sha256_file
from noop_rt.runtime.errors import BackboneError, BadInputError
from noop_rt.train.diffusion_error import ClassErrors

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
    """z0 of a latent model: `(vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor` (never a sample;
    shift_factor 0 where the VAE config has none, as SD 1.x/2.x/SDXL; SD3's VAE has one)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, c, H/f, W/f)
        mean = self.vae.encode(image).latent_dist.mean
        return (mean - self.shift) * self.scale if self.shift else mean * self.scale


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
    lora: dict | None = None  # {"file", "sha256", "scale", "unet_layers", "text_encoder_layers"} when one is fused
    family: str = "sd"  # "sd" (SD 1.x/2.x and the demo) | "sdxl" | "sd3" (train/families.py)
    conditioner: nn.Module | None = None  # token ids -> class embeddings; None: the text encoder's last hidden state
    tokenizers: tuple[tuple[str, object, int], ...] = ()  # SDXL/SD3: (folder, tokenizer, length) per tokenizer
    sigmas: torch.Tensor | None = None  # flow matching: the scheduler's shifted sigma of each timestep index (T,)
    cond_dim: int | None = None  # the class embeddings' width where it is not the text encoder's

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @property
    def text_dim(self) -> int:
        return self.cond_dim or int(self.text_encoder.config.hidden_size)

    @property
    def token_length(self) -> int:
        """Length of the token ids `tokenize` returns (SDXL/SD3: every tokenizer's ids, concatenated)."""
        return sum(n for _, _, n in self.tokenizers) if self.tokenizers else self.max_tokens

    @property
    def schedule(self) -> torch.Tensor:
        """What a timestep index selects: sigmas (flow matching) or alphas_cumprod (DDPM)."""
        return self.sigmas if self.sigmas is not None else self.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (C, L), padded to the text encoder's length as Stable Diffusion does (SDXL/SD3: each
        tokenizer's ids padded to its own length, concatenated)."""
        if self.tokenizers:
            return torch.cat([tok(prompts, padding="max_length", max_length=n, truncation=True,
                                  return_tensors="pt").input_ids for _, tok, n in self.tokenizers], dim=1)
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                              return_tensors="pt").input_ids

    def text_conditioner(self) -> nn.Module:
        """Token ids -> class embeddings (C, L, D)."""
        if self.conditioner is not None:
            return self.conditioner
        from noop_rt.train.conditioning import ClipLastHidden

        return ClipLastHidden(self.text_encoder)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Class embeddings (C, L, D) in float32: the text encoder's last hidden state (SDXL/SD3: the prompt
        embeddings with the pooled embedding as their last row, train/conditioning.py)."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_conditioner()(ids).float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z0 (B, c, h, w) float32 from RGB images (B, 3, H, W) in [-1, 1]."""
        return self.encoder(images.to(self.device, self.dtype)).float()

    def class_errors(self, losses: tuple[str, ...] = ("l2",)) -> ClassErrors:
        """The scoring module (noising, class broadcast, UNet, v->eps, error norms) over this backbone's UNet."""
        return ClassErrors(self.unet, self.schedule, self.prediction_type, losses).to(self.device)

    def unet_gflop(self) -> float:
        """GFLOP of one UNet forward at batch 1 (2 x multiply-adds), counted by torch's FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode

        param = next(self.unet.parameters())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.unet(torch.zeros((1, *self.latent_shape), dtype=param.dtype, device=param.device),
                      torch.tensor([500.0], device=param.device),
                      encoder_hidden_states=torch.zeros((1, self.max_tokens, self.text_dim), dtype=param.dtype,
                                                        device=param.device))
        return counter.get_total_flops() / 1e9

    def requires_grad_(self, flag: bool) -> Backbone:
        for module in (self.unet, self.text_conditioner(), self.encoder):
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
                  device: str | torch.device = "cpu", lora: str | Path | None = None, lora_scale: float = 1.0
                  ) -> Backbone:
    """Load a diffusers Stable Diffusion folder (or the demo) for scoring, with `lora` (a LoRA .safetensors) merged
    into it at `lora_scale`; raises BackboneError naming what is wrong."""
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
    from noop_rt.train import families

    family = families.family_of(index, root)
    device = torch.device(device)
    if family != families.SD:
        return _load_family(family, root, index, source, dtype, device, lora)
    pixel = "vae" not in index
    missing = _missing_files(root, pixel)
    if missing:
        raise BackboneError(f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        vae = None if pixel else AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(f"cannot load the model in {root}: {first}") from None
    lora_record = None if lora is None else fuse_lora(unet, text_encoder, Path(lora).expanduser(), lora_scale)
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
        max_tokens=max_tokens, dtype=dtype, device=device, lora=lora_record,
    )
    return backbone.requires_grad_(False)


def _load_family(family: str, root: Path, index: dict, source: str, dtype: torch.dtype, device: torch.device,
                 lora: str | Path | None) -> Backbone:
    """An SDXL or SD3 folder (train/families.py)."""
    from noop_rt.train import families

    name = {families.SDXL: "SDXL", families.SD3: "SD3"}[family]
    if lora is not None:
        raise BackboneError(f"--lora is supported on SD 1.x/2.x folders; {root} is an {name} folder")
    missing = families.missing_parts(root, index, family)
    if missing:
        raise BackboneError(f"{root} is not a complete diffusers {name} folder: missing {', '.join(missing)}")
    if family == families.SDXL:
        backbone = families.load_sdxl(root, source, dtype, device)
    else:
        backbone = families.load_sd3(root, index, source, dtype, device)
    return backbone.requires_grad_(False)


def pick_device(device: str) -> torch.device:
    """`auto` | `cpu` | `cuda[:N]` -> the torch device, refusing CUDA where torch sees none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda asked for, but torch sees no CUDA GPU")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadInputError(f"unknown device {device!r} (use auto, cpu or cuda[:N])") from None


# ---------------------------------------------------------------------------------------------- LoRA
_LORA_DOWN = re.compile(r"(lora_A|lora\.down|lora_down|_lora\.down|lora_linear_layer\.down)\.weight$")
_ADAPTER = "noop_rt_lora"


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """(state dict with diffusers `unet.` / `text_encoder.` keys, network alphas, diffusers' adapter metadata) of a
    LoRA file, through diffusers' own reader (kohya/A1111 keys converted); BackboneError when it is not one."""
    if not path.is_file():
        raise BackboneError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise BackboneError(f"{path}: --lora takes a LoRA .safetensors file (diffusers or kohya format)")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    try:
        state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(path.parent), weight_name=path.name, use_safetensors=True, local_files_only=True,
            return_lora_metadata=True)
    except Exception as exc:  # safetensors and diffusers raise many types on a corrupt or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BackboneError(f"{path} is not a readable LoRA safetensors file ({type(exc).__name__}"
                            f"{': ' + first[:120] if first else ''})") from None
    if not any("lora" in k for k in state):
        raise BackboneError(f"{path} holds no LoRA weights (no lora_A/lora_B, lora.down/lora.up or lora_unet_* "
                            "keys)")
    if not any(k.startswith(("unet.", "text_encoder.")) for k in state):
        state = {f"unet.{k}": v for k, v in state.items()}  # a bare UNet adapter (peft's get_peft_model_state_dict)
        alphas = None if alphas is None else {f"unet.{k}": v for k, v in alphas.items()}
    return state, alphas, metadata


def _merge_and_unload(module: nn.Module, scale: float) -> int:
    """Merge every peft LoRA layer of `module` into its base weights (scaled), then put the base layers back."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        if scale != 1.0:
            layer.scale_layer(scale)
        layer.merge()
    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = None
    return len(layers)


def _load_adapter(part: str, module: nn.Module, state: dict, alphas: dict | None, metadata: dict | None) -> None:
    """diffusers' own LoRA loading (through peft) into the UNet or the text encoder, as adapter `_ADAPTER`."""
    if part == "unet":
        module.load_lora_adapter(state, prefix="unet", network_alphas=None if metadata else alphas,
                                 metadata=metadata, adapter_name=_ADAPTER)
        return
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state, None if metadata else alphas, module, prefix="text_encoder", metadata=metadata, adapter_name=_ADAPTER)


def _reason(exc: BaseException) -> str:
    """The informative line of a loading error: torch's state-dict errors start with a header line ending in ':'
    and list a `size mismatch for ...` line per tensor."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    detail = [line for line in lines if not line.endswith(":")]
    mismatches = [line for line in lines if line.startswith("size mismatch")]
    if mismatches:
        return mismatches[0] + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
    return detail[0] if detail else lines[0]


@contextlib.contextmanager
def _silenced_loggers() -> Iterator[None]:
    """diffusers/peft/transformers quiet below CRITICAL while a LoRA loads: its errors reach the user as ours."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def fuse_lora(unet: nn.Module, text_encoder: nn.Module, path: Path, scale: float = 1.0) -> dict:
    """Merge the LoRA at `path` into `unet` (and `text_encoder` if the file adapts it), in place; the record
    checkpoints and bundles keep. BackboneError if the file does not fit these networks."""
    from noop_rt.runtime.backends.base import installed

    if not installed("peft"):
        from noop_rt.runtime.errors import MissingDependencyError

        raise MissingDependencyError("--lora needs peft (diffusers loads LoRA through it): pip install peft")
    state, alphas, metadata = read_lora(path)
    counts = {}
    for part, module in (("unet", unet), ("text_encoder", text_encoder)):
        keys = [k for k in state if k.startswith(f"{part}.")]
        expected = sum(1 for k in keys if _LORA_DOWN.search(k))
        if not keys:
            counts[part] = 0
            continue
        try:
            with _silenced_loggers():  # diffusers logs its own copy of a failure (one line per tensor) on stderr
                _load_adapter(part, module, state, alphas, metadata)
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            raise BackboneError(f"{path} does not fit this model's {part}: {_reason(exc)[:200]}") from None
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer))
        if adapted < max(expected, 1):
            raise BackboneError(f"{path} does not fit this model's {part}: {adapted} of {expected} LoRA layers "
                                "match its layer names (a LoRA for another architecture?)")
        counts[part] = _merge_and_unload(module, scale)
    return {"file": str(path.resolve()), "sha256": sha256_file(path), "scale": float(scale),
            "unet_layers": counts["unet"], "text_encoder_layers": counts["text_encoder"]}
