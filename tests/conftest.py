"""Shared fixtures: tiny Stable-Diffusion-architecture models built from configs in code (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noop_rt.configs import TINY_SD, random_components, save_components

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
