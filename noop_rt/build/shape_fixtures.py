"""Random-weight models of the real architectures, for benchmarks: latency does not depend on the weights.

`prepare("sd15-shape", classes=37)` builds (once, cached) an SD-1.5-architecture diffusers folder, a NoOp checkpoint
for it with random noise and meta-net, and its exported bundle; `noop-rt bench --backbone sd15-shape` then times them
through the API like any other model.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from noop_rt.train.architectures import SD_SCALED_LINEAR, Architecture, random_components, save_components

# Stable Diffusion 1.5 shapes (random weights): 512 px, 4x64x64 latent, CLIP ViT-L/14 text tower, 77 tokens.
SD15_SHAPE = Architecture(
    name="sd15-shape",
    unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
          "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
          "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
          "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32},
    text_hidden=768, text_layers=12, text_heads=12, text_ffn=3072, max_tokens=77, vocab_size=49408,
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
         "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215},
    scheduler=SD_SCALED_LINEAR,
)
# An SDXL-sized stand-in (random weights), for export memory: SDXL-base's UNet blocks (1024 px, 4x128x128 latent,
# 2048-wide cross-attention, 1/2/10 transformer layers per level, linear projections) without its `text_time` added
# conditioning (about 5 M of its 2.57 B parameters), and one CLIP text tower 2048 wide, sized to SDXL's two text
# encoders together (about 0.8 B parameters); SDXL's VAE architecture. The real SDXL backbone is a model folder.
SDXL_SHAPE = Architecture(
    name="sdxl-shape",
    unet={"sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
          "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
          "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
          "layers_per_block": 2, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
          "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "norm_num_groups": 32},
    text_hidden=2048, text_layers=14, text_heads=16, text_ffn=8192, max_tokens=77, vocab_size=49408,
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
         "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025},
    scheduler=SD_SCALED_LINEAR,
)
SHAPES = {SD15_SHAPE.name: SD15_SHAPE, SDXL_SHAPE.name: SDXL_SHAPE}  # benchmark fixtures (bench: SHAPE_FIXTURES)
REFERENCE_UNET_GFLOP = {SD15_SHAPE.name: 803.0}  # one sample at the 64x64 latent (design §2b)


@dataclass(frozen=True)
class ShapeFixture:
    """What a shape benchmark times: a checkpoint (torch backend) and, when asked for, its bundle."""

    name: str
    ckpt: Path
    bundle: Path | None
    reference_gflop: float | None


def shape_model(name: str, folder: Path, log: IO[str] = sys.stderr) -> Path:
    """A diffusers folder of the `name` architecture with random weights, cached as `folder/name`."""
    model_dir = folder / name
    if not (model_dir / "model_index.json").is_file():
        print(f"building a {name} model with random weights in {model_dir} …", file=log)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder))
        save_components(random_components(SHAPES[name]), str(tmp))
        tmp.rename(model_dir)
    return model_dir


def shape_checkpoint(name: str, folder: Path, classes: int, log: IO[str] = sys.stderr) -> Path:
    """A NoOp checkpoint with a random learned noise and meta-net for the `name` model, cached in `folder`."""
    from noop_rt.train.backbones import load_backbone
    from noop_rt.train.checkpoint import NoopCheckpoint, backbone_fingerprint, save_checkpoint
    from noop_rt.train.noop import MetaNet, MetaNetConfig

    model_dir = shape_model(name, folder, log)
    ckpt_path = folder / f"{name}-{classes}.pt"
    if not ckpt_path.is_file():
        backbone = load_backbone(model_dir)
        names = [f"class {i}" for i in range(classes)]
        prompts = [f"a photo of a {n}" for n in names]
        meta = MetaNet(MetaNetConfig(4, (64, 128, 256)))
        ckpt = NoopCheckpoint(
            backbone_source=str(model_dir), backbone_fingerprint=backbone_fingerprint(backbone), classes=names,
            prompts=prompts, template="a photo of a {}", t_star=500, loss="l2",
            eps_d=torch.randn(backbone.latent_shape), meta_net_config={"in_channels": 4, "channels": [64, 128, 256]},
            meta_net_state=meta.state_dict(), class_embeddings=backbone.embed(prompts), tau=1.0,
            train={"note": "random weights for latency measurement only"})
        save_checkpoint(ckpt, ckpt_path)
    return ckpt_path


def prepare(name: str, classes: int, cache_dir: Path, *, fp16: bool = False, bundle: bool = True,
            log: IO[str] = sys.stderr) -> ShapeFixture:
    """The `name` fixture with `classes` classes in `cache_dir`: checkpoint, and its fp32/fp16 bundle if `bundle`."""
    from noop_rt.build.export import ExportOptions, export_bundle

    folder = cache_dir.expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = shape_checkpoint(name, folder, classes, log)
    bundle_dir = None
    if bundle:
        precision = "fp16" if fp16 else "fp32"
        bundle_dir = folder / f"bundle-{classes}-{precision}"
        export_bundle(ckpt, bundle_dir, ExportOptions(precision=precision, images_per_batch=1, min_agreement=0.0),
                      log=log)
    return ShapeFixture(name, ckpt, bundle_dir, REFERENCE_UNET_GFLOP.get(name))
