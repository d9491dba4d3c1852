"""LoRA (`load_backbone(..., lora=FILE)`): a LoRA made in code for the tiny SD model changes the scores, is merged
exactly as W + scale * alpha/r * B A (diffusers and kohya key formats, UNet and text encoder), the merged model scores
like the unmerged adapter applied on the fly, and a bad file is a one-line BackboneError."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from noop_rt.runtime.errors import BackboneError, MissingDependencyError
from noop_rt.train.backbones import load_backbone

pytest.importorskip("peft", reason="LoRA loading goes through peft (pip install peft)")

LAYERS = ("attn1.to_q", "attn2.to_v", "attn1.to_out.0")
RANK = 2


@pytest.fixture(scope="module")
def base(tiny_sd):
    return load_backbone(tiny_sd)


def lora_layers(unet: torch.nn.Module) -> list[str]:
    return [n for n, _ in unet.named_modules() if n.endswith(LAYERS)]


def make_lora(base, folder: Path, seed: int = 0) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A diffusers/peft-format UNet LoRA (`unet.<module>.lora_A/B.weight`, no alphas: scaling 1) on LAYERS of every
    transformer block; returns the file and {module: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    pairs, state = {}, {}
    for name in lora_layers(base.unet):
        w = base.unet.get_submodule(name).weight
        a = torch.randn(RANK, w.shape[1], generator=g) * 0.2
        b = torch.randn(w.shape[0], RANK, generator=g) * 0.2
        pairs[name] = (a, b)
        state[f"unet.{name}.lora_A.weight"] = a
        state[f"unet.{name}.lora_B.weight"] = b
    path = folder / "tiny_lora.safetensors"
    save_file(state, str(path))
    return path, pairs


def unet_out(unet: torch.nn.Module, base) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    z = torch.randn((3, *base.latent_shape), generator=g)
    t = torch.tensor([100.0, 400.0, 800.0])
    emb = base.embed(["red square", "blue circle", ""])
    with torch.no_grad():
        return unet(z, t, encoder_hidden_states=emb).sample


def test_lora_changes_the_class_errors(base, tiny_sd, tmp_path) -> None:
    path, _ = make_lora(base, tmp_path)
    adapted = load_backbone(tiny_sd, lora=path)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn((2, *base.latent_shape), generator=g)
    eps = torch.randn((2, *base.latent_shape), generator=g)
    t = torch.tensor([300.0, 600.0])
    emb = base.embed(["red square", "blue circle"])
    with torch.no_grad():
        before = base.class_errors()(z0, eps, t, emb)[0]
        after = adapted.class_errors()(z0, eps, t, emb)[0]
    assert (after - before).abs().max() > 1e-3 * before.abs().max()


def test_merged_weights_are_the_delta_by_hand_and_score_like_the_unmerged_adapter(base, tiny_sd, tmp_path) -> None:
    path, pairs = make_lora(base, tmp_path)
    adapted = load_backbone(tiny_sd, lora=path)
    for name, (a, b) in pairs.items():  # every adapted layer: W + B A (alpha = r: scaling 1)
        assert torch.allclose(adapted.unet.get_submodule(name).weight,
                              base.unet.get_submodule(name).weight + b @ a, atol=1e-6)
        assert type(adapted.unet.get_submodule(name)) is torch.nn.Linear  # plain layers again: export traces them
    by_hand = copy.deepcopy(base.unet)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            by_hand.get_submodule(name).weight += b @ a
    unmerged = copy.deepcopy(base.unet)  # diffusers/peft applying the adapter on the fly, not merged
    unmerged.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name="x")
    merged_out = unet_out(adapted.unet, base)
    assert torch.allclose(merged_out, unet_out(by_hand, base), atol=1e-5)
    assert torch.allclose(merged_out, unet_out(unmerged, base), atol=1e-5)
    assert not torch.allclose(merged_out, unet_out(base.unet, base), atol=1e-3)
    assert len(pairs) == adapted.lora["unet_layers"] and adapted.lora["text_encoder_layers"] == 0
    assert adapted.lora["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert adapted.lora["file"] == str(path.resolve()) and adapted.lora["scale"] == 1.0
    assert base.lora is None


def test_kohya_file_with_alphas_and_text_encoder_layers_at_a_scale(base, tiny_sd, tmp_path) -> None:
    """kohya/A1111 keys (lora_unet_* / lora_te_*, lora_down/lora_up, alpha): W + scale * alpha/r * up down."""
    g = torch.Generator().manual_seed(2)
    state, expected = {}, {}
    unet_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te_names = [f"encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    for part, name in [("unet", unet_name)] + [("te", n) for n in te_names]:
        module = base.unet if part == "unet" else base.text_encoder
        w = module.get_submodule(name).weight
        down, up = torch.randn(RANK, w.shape[1], generator=g), torch.randn(w.shape[0], RANK, generator=g)
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        key = prefix + name.replace(".", "_")
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
        expected[(part, name)] = w + 0.3 * (1.0 / RANK) * up @ down
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    adapted = load_backbone(tiny_sd, lora=path, lora_scale=0.3)
    for (part, name), want in expected.items():
        module = adapted.unet if part == "unet" else adapted.text_encoder
        assert torch.allclose(module.get_submodule(name).weight, want, atol=1e-6), name
    assert adapted.lora["unet_layers"] == 1 and adapted.lora["text_encoder_layers"] == 4
    assert not torch.allclose(adapted.embed(["red square"]), base.embed(["red square"]))


def bad_files(base, folder: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, expected message part)}."""
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file at all" * 10)
    no_lora = folder / "no_lora.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(no_lora))
    foreign = folder / "foreign.safetensors"  # layer names of another architecture
    save_file({"unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 8),
               "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 2)},
              str(foreign))
    name = lora_layers(base.unet)[0]
    w = base.unet.get_submodule(name).weight
    wrong_shape = folder / "wrong_shape.safetensors"  # SD-1.5 widths on the tiny UNet
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(4, w.shape[1] + 3),
               f"unet.{name}.lora_B.weight": torch.zeros(w.shape[0] + 3, 4)}, str(wrong_shape))
    partial = folder / "partial.safetensors"  # one layer fits, one does not exist here
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(2, w.shape[1]),
               f"unet.{name}.lora_B.weight": torch.zeros(w.shape[0], 2),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight": torch.zeros(2, 2),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight": torch.zeros(2, 2)},
              str(partial))
    pickle = folder / "lora.bin"
    pickle.write_bytes(b"x")
    return {"missing": (folder / "nope.safetensors", "LoRA file not found"),
            "pickle": (pickle, ".safetensors"),
            "garbage": (garbage, "not a readable LoRA safetensors file"),
            "no_lora": (no_lora, "holds no LoRA weights"),
            "foreign": (foreign, "does not fit this model's unet"),
            "wrong_shape": (wrong_shape, "size mismatch"),
            "partial": (partial, "does not fit this model's unet")}


def test_a_bad_lora_file_is_a_one_line_backbone_error(base, tiny_sd, tmp_path, capfd) -> None:
    for case, (path, message) in bad_files(base, tmp_path).items():
        with pytest.raises(BackboneError) as info:
            load_backbone(tiny_sd, lora=path)
        text = str(info.value)
        assert message in text, (case, text)
        assert "\n" not in text and str(path.name) in text, (case, text)
        printed = capfd.readouterr()
        assert printed.err.strip() == "" and printed.out.strip() == "", (case, printed)  # the libraries kept quiet


def test_lora_without_peft_says_what_to_install(base, tiny_sd, tmp_path, monkeypatch) -> None:
    import noop_rt.runtime.backends.base as backend

    path, _ = make_lora(base, tmp_path)
    real = backend.installed
    monkeypatch.setattr(backend, "installed", lambda module: False if module == "peft" else real(module))
    with pytest.raises(MissingDependencyError, match="pip install peft"):
        load_backbone(tiny_sd, lora=path)


def test_lora_through_train_export_and_classify(base, tiny_sd, shape_images, tmp_path) -> None:
    """`train --lora` records the LoRA, `export` fuses it into the bundle's graphs (which then score like the torch
    checkpoint on the adapted backbone, not like the plain one), a moved file is found again with --lora, another
    LoRA is refused, and a bundle refuses --lora: each a one-line error."""
    import json
    import shutil

    import numpy as np
    from typer.testing import CliRunner

    import noop_rt
    from noop_rt.cli import app
    from noop_rt.runtime.classes import ImageFolder
    from noop_rt.runtime.images import load_image
    from noop_rt.train.checkpoint import load_checkpoint

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    lora, _ = make_lora(base, tmp_path)
    ckpt = tmp_path / "adapted.pt"
    res = invoke("train", "--model", tiny_sd, "--data", shape_images, "--shots", "2", "--val-shots", "1",
                 "--epochs", "1", "--batch-size", "2", "--lora", lora, "--lora-scale", "0.5", "--out", ckpt)
    assert res.exit_code == 0, res.output
    recorded = load_checkpoint(ckpt).backbone_fingerprint["lora"]
    assert recorded["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest() and recorded["scale"] == 0.5

    bundle = tmp_path / "bundle"
    res = invoke("export", "--ckpt", ckpt, "--out", bundle, "--validate-data", shape_images, "--images-per-batch", "3")
    assert res.exit_code == 0, res.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backbone"]["lora"]["sha256"] == recorded["sha256"] and manifest["backbone"]["lora"]["fused"]

    paths = [str(p) for p, _ in ImageFolder.scan(shape_images).samples[:4]]
    on_bundle = noop_rt.load(bundle, backend="onnxruntime")
    images = np.stack([load_image(p, on_bundle.model.info.resolution) for p in paths])
    errors_bundle = on_bundle.score(images)[0].errors
    errors_torch = noop_rt.load(ckpt, backend="torch").score(images)[0].errors
    np.testing.assert_allclose(errors_bundle, errors_torch, rtol=1e-4, atol=1e-6)
    # the same checkpoint's noise over the plain backbone scores otherwise: the bundle did not drop the LoRA
    from noop_rt.runtime.backends.torch_runner import TorchRunner

    plain = TorchRunner(load_backbone(tiny_sd), load_checkpoint(ckpt))
    errors_plain = plain.run("classifier", {"image": images}, ["errors"])[0]
    assert np.abs(errors_plain - errors_bundle).max() > 100 * np.abs(errors_torch - errors_bundle).max() + 1e-6

    moved = tmp_path / "elsewhere" / "adapter.safetensors"
    moved.parent.mkdir()
    shutil.move(lora, moved)
    res = invoke("classify", "--ckpt", ckpt, paths[0])
    assert res.exit_code != 0 and "not there any more" in res.output and "--lora" in res.output
    assert res.output.count("\n") <= 2, res.output
    res = invoke("classify", "--ckpt", ckpt, "--lora", moved, "--json", paths[0])
    assert res.exit_code == 0, res.output
    res = invoke("classify", "--model", tiny_sd, "--lora", moved, "--classes", "red square,blue circle",
                 "--noises", "2", paths[0])  # zero-shot on the adapted SD folder
    assert res.exit_code == 0, res.output
    other, _ = make_lora(base, tmp_path / "elsewhere", seed=7)
    res = invoke("classify", "--ckpt", ckpt, "--lora", other, paths[0])
    assert res.exit_code != 0 and "trained with the LoRA" in res.output, res.output
    res = invoke("classify", "--model", tiny_sd, "--lora-scale", "0.5", "--classes", "a,b", paths[0])
    assert res.exit_code != 0 and "--lora-scale" in res.output, res.output
    res = invoke("classify", "--bundle", bundle, "--lora", moved, paths[0])
    assert res.exit_code != 0 and "a bundle carries the LoRA" in res.output, res.output
