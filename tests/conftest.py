"""Shared fixtures: tiny Stable-Diffusion-architecture models built from configs in code (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noop_rt.train.architectures import TINY_SD, random_components, save_components

TINY_WORDS = ("red", "green", "blue", "square", "circle")


def write_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    parts = random_components(TINY_SD, seed=seed, extra_words=TINY_WORDS)
    parts.scheduler.register_to_config(prediction_type=prediction_type)
    save_components(parts, str(folder))
    cfg = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(cfg.read_text())
    data["prediction_type"] = prediction_type
    cfg.write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete diffusers SD folder (AutoencoderKL + UNet2DConditionModel + CLIPTextModel + tokenizer)."""
    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with a v-prediction scheduler config (SD 2.x 768-v style)."""
    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def shape_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-folder tree with two classes of simple 40x48 RGB images."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for cls, colour in (("red_square", (220, 30, 30)), ("blue_circle", (30, 30, 220))):
        (root / cls).mkdir()
        for i in range(3):
            arr = (rng.random((40, 48, 3)) * 40).astype(np.uint8)
            arr[10:30, 12:36] = colour
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_sd, shape_images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NoOp checkpoint trained briefly on the tiny SD model (eps_D + meta-net)."""
    from noop_rt.train.backbones import load_backbone
    from noop_rt.train.checkpoint import save_checkpoint
    from noop_rt.train.noop import TrainConfig
    from noop_rt.train.trainer import fewshot_split, train_checkpoint

    backbone = load_backbone(tiny_sd)
    split = fewshot_split(shape_images, shots=2, val_shots=1, seed=0)
    config = TrainConfig(epochs=2, batch_size=2, meta_channels=(8, 16))
    ckpt, _ = train_checkpoint(backbone, split, "a {}", config, show_progress=False)
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, shape_images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to an fp32 ONNX bundle (validated on the shape images)."""
    import io

    from noop_rt.build.export import ExportOptions, collect_images, export_bundle

    out = tmp_path_factory.mktemp("export") / "tiny"
    options = ExportOptions(validate_images=collect_images(shape_images), images_per_batch=3)
    export_bundle(tiny_ckpt, out, options, log=io.StringIO())
    return out


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A StableDiffusionXLPipeline folder written by the pipeline's own save_pretrained (random tiny networks)."""
    from noop_rt.train.architectures import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline(extra_words=TINY_WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A StableDiffusion3Pipeline folder (CLIP-L, CLIP-G, T5, SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler
    with shift 3) written by the pipeline's own save_pretrained."""
    from noop_rt.train.architectures import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline(extra_words=TINY_WORDS).save_pretrained(folder)
    return folder
