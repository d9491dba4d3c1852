"""Loading diffusers Stable Diffusion folders (latent) and pixel-space models through one interface."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from noop_rt.runtime.errors import BackboneError
from noop_rt.train.backbones import load_backbone


def test_latent_sd_folder_loads_with_its_geometry(tiny_sd) -> None:
    bb = load_backbone(tiny_sd)
    assert bb.kind == "latent" and bb.prediction_type == "epsilon"
    assert bb.resolution == 32  # unet sample_size 16 x 2 ** (len(vae blocks) - 1)
    assert bb.latent_shape == (4, 16, 16)
    z0 = bb.encode(torch.zeros(2, 3, 32, 32))
    assert z0.shape == (2, 4, 16, 16) and z0.dtype == torch.float32
    emb = bb.embed(["a red square", "a blue circle"])
    assert emb.shape == (2, 16, 32)
    assert bb.text_dim == 32 and bb.num_train_timesteps == 1000
    # the scheduler's own schedule, not a re-derived one
    assert torch.equal(bb.alphas_cumprod, DDPMScheduler.from_pretrained(tiny_sd / "scheduler").alphas_cumprod.float())
    assert not hasattr(bb, "predict_eps")  # scoring lives in one place: the ClassErrors module
    # The encoder is the VAE posterior mean times the scaling factor, never a sample.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(bb.encode(x), bb.encode(x))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_class_errors_module_runs_the_backbones_unet(prediction, tiny_sd, tiny_sd_v) -> None:
    bb = load_backbone(tiny_sd if prediction == "epsilon" else tiny_sd_v)
    assert bb.prediction_type == prediction  # read from scheduler/scheduler_config.json
    module = bb.class_errors(("l1", "l2"))
    assert module.unet is bb.unet and module.prediction_type == prediction and module.losses == ("l1", "l2")
    assert torch.equal(module.alphas_cumprod, bb.alphas_cumprod)
    assert not any(p.requires_grad for p in bb.unet.parameters())  # frozen
    emb = bb.embed(["a red square", "a blue circle", "a green circle"])
    z0 = bb.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        l1, l2 = module(z0, torch.randn_like(z0), torch.tensor([10.0, 900.0]), emb)
    assert l1.shape == l2.shape == (2, 3) and l1.dtype == torch.float32
    assert (l2 > 0).all() and not torch.allclose(l1, l2)


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
    assert bb.encode(torch.zeros(1, 3, 32, 32)).dtype == torch.float32
