"""The NoOp checkpoint `NAME.pt`: plain tensors and dicts (loadable with `weights_only=True`), written atomically.

Self-describing, as nanoGPT's: format tag + version, backbone reference and fingerprint, classes, prompts, template,
t*, loss, eps_D, meta-net config + state, optional prompt context, cached class embeddings, tau, training record.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noop_rt.runtime.errors import CheckpointError
from noop_rt.train.backbones import DEMO_SOURCE, Backbone
from noop_rt.train.noop import MetaNet, MetaNetConfig, NoiseModel

FORMAT = "noop-rt.ckpt"
VERSION = 1


def backbone_fingerprint(backbone: Backbone) -> dict[str, Any]:
    """What identifies a backbone across dtypes and machines: config hashes and a sample of first-layer weights."""
    def config_hash(module: Any) -> str:
        raw = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        volatile = {"torch_dtype", "dtype", "transformers_version", "architectures", "use_cache", "output_attentions",
                    "output_hidden_states", "return_dict"}
        cfg = {k: v for k, v in raw.items() if not k.startswith("_") and k not in volatile}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    net = getattr(backbone.unet, "net", backbone.unet)  # SDXL/SD3: the diffusers network behind the Denoiser
    first = net.conv_in if hasattr(net, "conv_in") else net.pos_embed.proj  # UNet | SD3 transformer's patch conv
    probe = first.weight.detach().float().flatten()[:32].cpu()
    lora = None if backbone.lora is None else {k: backbone.lora[k] for k in ("file", "sha256", "scale")}
    return {"unet_config": config_hash(backbone.unet), "text_encoder_config": config_hash(backbone.text_encoder),
            "conv_in_probe": probe.tolist(), "kind": backbone.kind, "resolution": backbone.resolution,
            "latent_shape": list(backbone.latent_shape), "prediction_type": backbone.prediction_type, "lora": lora}


def same_backbone(recorded: dict[str, Any], backbone: Backbone) -> str | None:
    """None if `backbone` is the one `recorded` describes, else the reason it is not."""
    current = backbone_fingerprint(backbone)
    for key in ("kind", "resolution", "latent_shape", "unet_config", "text_encoder_config", "prediction_type"):
        if recorded.get(key) != current[key]:
            return f"{key} differs ({recorded.get(key)} vs {current[key]})"
    a, b = torch.tensor(recorded["conv_in_probe"]), torch.tensor(current["conv_in_probe"])
    if not torch.allclose(a, b, rtol=1e-2, atol=1e-3):
        return "the UNet weights differ"
    return _lora_differs(recorded.get("lora"), current["lora"])


def _lora_differs(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """None when both have no LoRA or the same file content at the same scale, else the reason."""
    if recorded is None and current is None:
        return None
    if recorded is None:
        return f"it was trained without a LoRA, and {current['file']} is fused here"
    wanted = f"the LoRA {recorded['file']} (sha256 {recorded['sha256'][:12]}, scale {recorded['scale']:g})"
    if current is None:
        return f"it was trained with {wanted}, which is not loaded (--lora FILE)"
    if current["sha256"] != recorded["sha256"]:
        return f"it was trained with {wanted}, not {current['file']} (sha256 {current['sha256'][:12]})"
    if abs(float(current["scale"]) - float(recorded["scale"])) > 1e-9:
        return f"it was trained with {wanted}, not at scale {current['scale']:g}"
    return None


def checkpoint_backbone(ckpt: NoopCheckpoint, path: Path, model: str | None = None, lora: str | Path | None = None,
                        lora_scale: float | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Backbone:
    """The backbone a checkpoint was trained on (or `model`, which must be the same network), with the LoRA it was
    trained with fused again (from its recorded file, or `lora` when the file moved); CheckpointError if they
    differ."""
    from noop_rt.train.backbones import load_backbone

    recorded = ckpt.backbone_fingerprint.get("lora")
    if lora is None and recorded is not None:
        lora = Path(recorded["file"])
        if not lora.is_file():
            raise CheckpointError(f"{path} was trained with the LoRA {lora}, which is not there any more: pass its "
                                  f"new place with --lora FILE (sha256 {recorded['sha256'][:12]})")
    if lora_scale is None:
        lora_scale = float(recorded["scale"]) if recorded is not None else 1.0
    backbone = load_backbone(model or ckpt.backbone_source, dtype=dtype, device=device, lora=lora,
                             lora_scale=lora_scale)
    reason = same_backbone(ckpt.backbone_fingerprint, backbone)
    if reason is not None:
        raise CheckpointError(f"{path} was trained on another backbone than {backbone.source}: {reason}")
    return backbone


@dataclass
class NoopCheckpoint:
    backbone_source: str  # "demo" or a diffusers folder path
    backbone_fingerprint: dict[str, Any]
    classes: list[str]
    prompts: list[str]
    template: str
    t_star: int
    loss: str
    eps_d: torch.Tensor  # (c, h, w)
    meta_net_config: dict[str, Any] | None
    meta_net_state: dict[str, torch.Tensor] | None
    class_embeddings: torch.Tensor  # (C, L, D) float32
    tau: float
    prompt_ctx: torch.Tensor | None = None  # (M, D) when prompt-tuned
    train: dict[str, Any] = field(default_factory=dict)

    def noise_model(self) -> NoiseModel:
        meta = None
        if self.meta_net_config is not None:
            cfg = MetaNetConfig(int(self.meta_net_config["in_channels"]), tuple(self.meta_net_config["channels"]))
            meta = MetaNet(cfg)
            meta.load_state_dict(self.meta_net_state)
        return NoiseModel(self.eps_d, meta).eval().requires_grad_(False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION,
            "backbone": {"source": self.backbone_source, "fingerprint": self.backbone_fingerprint},
            "classes": list(self.classes), "prompts": list(self.prompts), "template": self.template,
            "t_star": int(self.t_star), "loss": self.loss, "eps_D": self.eps_d.detach().float().cpu().contiguous(),
            "meta_net": None if self.meta_net_config is None else {
                "config": self.meta_net_config,
                "state_dict": {k: v.detach().float().cpu().contiguous() for k, v in self.meta_net_state.items()}},
            "prompt_ctx": None if self.prompt_ctx is None else self.prompt_ctx.detach().float().cpu(),
            "class_embeddings": self.class_embeddings.detach().float().cpu().contiguous(),
            "tau": float(self.tau), "train": self.train,
        }


def save_checkpoint(ckpt: NoopCheckpoint, path: str | Path) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(ckpt.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> NoopCheckpoint:
    """Read and validate a checkpoint; CheckpointError on a missing, truncated, foreign or newer file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing: one line only
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, KeyError, RuntimeError...) on junk
        # (torch's own messages suggest weights_only=False, which a checkpoint of ours never needs: not repeated)
        raise CheckpointError(f"{path} is not a readable noop-rt checkpoint (corrupt, truncated or not a torch "
                              f"file; {type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a noop-rt checkpoint (format tag {FORMAT!r} missing)")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {raw.get('version')}; this noop-rt reads {VERSION}")
    try:
        meta = raw["meta_net"]
        ckpt = NoopCheckpoint(
            backbone_source=str(raw["backbone"]["source"]), backbone_fingerprint=dict(raw["backbone"]["fingerprint"]),
            classes=list(raw["classes"]), prompts=list(raw["prompts"]), template=str(raw["template"]),
            t_star=int(raw["t_star"]), loss=str(raw["loss"]), eps_d=raw["eps_D"],
            meta_net_config=None if meta is None else dict(meta["config"]),
            meta_net_state=None if meta is None else dict(meta["state_dict"]),
            class_embeddings=raw["class_embeddings"], tau=float(raw["tau"]), prompt_ctx=raw.get("prompt_ctx"),
            train=dict(raw.get("train") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is missing checkpoint field {exc}") from None
    if len(ckpt.classes) != ckpt.class_embeddings.shape[0] or len(ckpt.classes) != len(ckpt.prompts):
        raise CheckpointError(f"{path}: {len(ckpt.classes)} classes but {ckpt.class_embeddings.shape[0]} embeddings")
    if tuple(ckpt.eps_d.shape) != tuple(ckpt.backbone_fingerprint.get("latent_shape", ())):
        raise CheckpointError(f"{path}: eps_D shape {tuple(ckpt.eps_d.shape)} does not match its backbone")
    return ckpt


def is_demo(ckpt: NoopCheckpoint) -> bool:
    return ckpt.backbone_source == DEMO_SOURCE
