"""Loading diffusers Stable Diffusion folders (latent) and pixel-space models through one interface."""

from __future__ import annotations

import shutil

import pytest
import torch

from noop_rt.backbone import load_backbone
from noop_rt.errors import BackboneError


def test_latent_sd_folder_loads_with_its_geometry(tiny_sd) -> None:
    bb = load_backbone(tiny_sd)
    assert bb.kind == "latent" and bb.prediction_type == "epsilon"
    assert bb.resolution == 32  # unet sample_size 16 x 2 ** (len(vae blocks) - 1)
    assert bb.latent_shape == (4, 16, 16)
    z0 = bb.encode(torch.zeros(2, 3, 32, 32))
    assert z0.shape == (2, 4, 16, 16) and z0.dtype == torch.float32
    emb = bb.embed(["a red square", "a blue circle"])
    assert emb.shape == (2, 16, 32)
    eps = bb.predict_eps(torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), emb)
    assert eps.shape == (2, 4, 16, 16)
    assert bb.alphas_cumprod.shape == (1000,)
    # The encoder is the VAE posterior mean times the scaling factor, never a sample.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(bb.encode(x), bb.encode(x))


def test_vocab_json_merges_tokenizer_layout_also_loads(tiny_sd, tmp_path) -> None:
    import json

    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd, folder)
    data = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    bb = load_backbone(folder)
    ref = load_backbone(tiny_sd)
    assert torch.equal(bb.tokenize(["a red square"]), ref.tokenize(["a red square"]))


@pytest.mark.parametrize("missing", ["unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                                     "scheduler/scheduler_config.json", "model_index.json"])
def test_incomplete_folder_names_the_missing_file(tiny_sd, tmp_path, missing: str) -> None:
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd, folder)
    (folder / missing).unlink()
    with pytest.raises(BackboneError, match=missing.split("/")[-1].replace(".", r"\.")):
        load_backbone(folder)


def test_not_a_folder(tmp_path) -> None:
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(tmp_path / "nowhere")
    with pytest.raises(BackboneError, match=r"model_index\.json is missing"):
        load_backbone(tmp_path)


def test_fp16_weights_load(tiny_sd) -> None:
    bb = load_backbone(tiny_sd, dtype=torch.float16)
    assert next(bb.unet.parameters()).dtype == torch.float16
    assert bb.embed(["a red square"]).dtype == torch.float32
