"""SDXL and SD3 (flow matching) backbones on tiny random folders written by each pipeline's own save_pretrained.

Expected values come from diffusers itself (`encode_prompt`, `_get_add_time_ids`, the networks called as the
pipelines call them) or from formulas written here (the flow-matching error), never from the code under test.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from noop_rt.runtime.errors import BackboneError
from noop_rt.runtime.images import load_image
from noop_rt.train.backbones import load_backbone

PROMPTS = ["a red square", "a blue circle"]
SHIFT, T = 3.0, 1000  # the tiny SD3 scheduler's shift; num_train_timesteps


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_backbone(tiny_sdxl)


@pytest.fixture(scope="module")
def sd3(tiny_sd3):
    return load_backbone(tiny_sd3)


def _images(shape_images: Path, resolution: int) -> np.ndarray:
    return np.stack([load_image(p, resolution) for p in sorted(shape_images.rglob("*.png"))])


# ================================================================================================ loading
def test_sdxl_folder_loads_with_its_geometry(sdxl) -> None:
    assert (sdxl.family, sdxl.kind, sdxl.prediction_type) == ("sdxl", "latent", "epsilon")
    assert sdxl.resolution == 32 and sdxl.latent_shape == (4, 16, 16)
    assert sdxl.text_dim == 16 + 24  # both CLIP widths
    assert sdxl.max_tokens == 16 + 1  # the prompt tokens and the pooled row
    assert sdxl.token_length == 2 * 16  # tokenizer and tokenizer_2 ids
    assert sdxl.unet.time_ids.tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]


def test_sd3_folder_loads_with_its_flow_schedule(sd3) -> None:
    assert (sd3.family, sd3.prediction_type) == ("sd3", "flow_matching")
    assert sd3.resolution == 32 and sd3.latent_shape == (4, 16, 16)
    assert sd3.text_dim == 32 and sd3.max_tokens == 16 + 12 + 1 and sd3.token_length == 16 + 16 + 12
    s = (torch.arange(T, dtype=torch.float64) + 1) / T
    sigma = SHIFT * s / (1 + (SHIFT - 1) * s)  # FlowMatchEulerDiscreteScheduler's shifted sigmas, by hand
    torch.testing.assert_close(sd3.sigmas.double(), sigma, rtol=1e-6, atol=1e-6)


def test_unsupported_architecture_is_one_line_naming_it(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(BackboneError, match=r"FluxPipeline.*StableDiffusionXLPipeline.*StableDiffusion3Pipeline"):
        load_backbone(tmp_path)


def test_sd3_dynamic_shifting_and_sdxl_lora_are_refused(tiny_sd3, tiny_sdxl, tmp_path) -> None:
    copy = tmp_path / "sd3"
    shutil.copytree(tiny_sd3, copy)
    cfg = copy / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(BackboneError, match="dynamic"):
        load_backbone(copy)
    with pytest.raises(BackboneError, match=r"--lora is supported on SD 1\.x/2\.x"):
        load_backbone(tiny_sdxl, lora=tmp_path / "x.safetensors")


def test_incomplete_sdxl_folder_names_the_missing_part(tiny_sdxl, tmp_path) -> None:
    copy = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl, copy)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(BackboneError, match=r"text_encoder_2/config\.json"):
        load_backbone(copy)


# ================================================================================================ conditioning
def test_sdxl_class_embeddings_are_the_pipelines_prompt_and_pooled_embeddings(tiny_sdxl, sdxl) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    emb = sdxl.embed(PROMPTS)
    assert emb.shape == (2, 17, 40) and prompt_embeds.shape == (2, 16, 40) and pooled.shape == (2, 24)
    torch.testing.assert_close(emb[:, :16], prompt_embeds)
    torch.testing.assert_close(emb[:, 16, :24], pooled)
    assert (emb[:, 16, 24:] == 0).all()


def test_sdxl_unet_gets_the_pipelines_added_conditioning(tiny_sdxl, sdxl) -> None:
    """The denoiser's call equals the UNet called as StableDiffusionXLPipeline calls it at this resolution."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2  # the pipeline's default height, width
    assert size == (32, 32)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([250.0, 700.0])
    with torch.no_grad():
        want = pipe.unet(z, t, encoder_hidden_states=prompt_embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)}).sample
        got = sdxl.unet(z, t, encoder_hidden_states=sdxl.embed(PROMPTS))[0]
        other = pipe.unet(z, t, encoder_hidden_states=prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": 2 * time_ids.repeat(2, 1)}).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other, want, atol=1e-4)  # the time ids reach the UNet: other sizes differ


def test_sd3_class_embeddings_are_the_pipelines(tiny_sd3, sd3) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                     do_classifier_free_guidance=False, max_sequence_length=12)
    emb = sd3.embed(PROMPTS)
    assert prompt_embeds.shape == (2, 16 + 12, 32) and pooled.shape == (2, 8 + 16)
    torch.testing.assert_close(emb[:, :-1], prompt_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[:, -1, :24], pooled, rtol=1e-5, atol=1e-5)
    assert (emb[:, -1, 24:] == 0).all()


def test_sd3_without_t5_conditions_as_the_pipeline_does(tiny_sd3, tmp_path) -> None:
    """`text_encoder_3: [null, null]`: the T5 part of the prompt embeddings is zeros of the pipeline's length."""
    from diffusers import StableDiffusion3Pipeline

    copy = tmp_path / "sd3-no-t5"
    shutil.copytree(tiny_sd3, copy)
    shutil.rmtree(copy / "text_encoder_3")
    shutil.rmtree(copy / "tokenizer_3")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                       "tokenizer_3": [None, None]}))
    backbone = load_backbone(copy)
    assert backbone.token_length == 2 * 16 and backbone.max_tokens == 16 + 256 + 1
    pipe = StableDiffusion3Pipeline.from_pretrained(copy, text_encoder_3=None, tokenizer_3=None)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                     do_classifier_free_guidance=False)
    emb = backbone.embed(PROMPTS)
    torch.testing.assert_close(emb[:, :-1], prompt_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[:, -1, :24], pooled, rtol=1e-5, atol=1e-5)


# ================================================================================================ flow matching
def test_flow_matching_error_by_hand(tiny_sd3, sd3) -> None:
    """x_s = (1 - s) x0 + s eps, v = eps - x0, error mean((v - v_hat)^2), with s the scheduler's shifted sigma and the
    transformer called as StableDiffusion3Pipeline calls it (timestep s * T); and at one s the eps-error
    (eps_hat = x_s + (1 - s) v_hat) is (1 - s)^2 times it, so it ranks classes the same."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                     do_classifier_free_guidance=False, max_sequence_length=12)
    net = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3 / "scheduler")
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100.0, 600.0])
    s = (t + 1) / T
    sigma = SHIFT * s / (1 + (SHIFT - 1) * s)
    want = torch.zeros(2, 2)
    eps_err = torch.zeros(2, 2)
    with torch.no_grad():
        for r in range(2):
            x = (1 - sigma[r]) * x0[r:r + 1] + sigma[r] * eps[r:r + 1]
            library = scheduler.scale_noise(x0[r:r + 1], scheduler.timesteps[T - 1 - int(t[r])].reshape(1),
                                            eps[r:r + 1])
            torch.testing.assert_close(library, x, rtol=1e-5, atol=1e-5)  # the scheduler's own forward process
            for k in range(2):
                v_hat = net(hidden_states=x, timestep=(sigma[r] * T).reshape(1),
                            encoder_hidden_states=prompt_embeds[k:k + 1], pooled_projections=pooled[k:k + 1]).sample
                want[r, k] = ((eps[r] - x0[r]) - v_hat[0]).square().mean()
                eps_hat = x + (1 - sigma[r]) * v_hat
                eps_err[r, k] = (eps[r] - eps_hat[0]).square().mean()
        got_l2, got_l1 = sd3.class_errors(("l2", "l1"))(x0, eps, t, sd3.embed(PROMPTS))
    torch.testing.assert_close(got_l2, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(eps_err, (1 - sigma).square().unsqueeze(1) * want, rtol=1e-4, atol=1e-7)
    assert (eps_err.argmin(dim=1) == got_l2.argmin(dim=1)).all()
    assert not torch.allclose(got_l1, got_l2)  # each loss its own norm of v - v_hat


# ================================================================================================ training
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_noop_trains_a_step(family, sdxl, sd3) -> None:
    from noop_rt.train.noop import TrainConfig, train_noop

    backbone = {"sdxl": sdxl, "sd3": sd3}[family]
    g = torch.Generator().manual_seed(1)
    z_train, z_val = torch.randn(4, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    config = TrainConfig(epochs=1, batch_size=4, meta_channels=(8, 16), seed=0)
    start = torch.randn(backbone.latent_shape, generator=torch.Generator().manual_seed(config.seed))  # eps_D's init
    result = train_noop(backbone, PROMPTS, "a {}", z_train, torch.tensor([0, 1, 0, 1]), z_val, torch.tensor([0, 1]),
                        config)
    assert np.isfinite(result.history[0]["train_loss"])
    assert not torch.allclose(result.noise.eps_d.detach(), start)  # the gradient reached eps_D through the model
    assert result.class_embeddings.shape == (2, backbone.max_tokens, backbone.text_dim)


# ================================================================================================ export + runtime
@pytest.fixture(scope="module", params=[pytest.param("sdxl", marks=pytest.mark.slow), "sd3"])
def exported(request, tiny_sdxl, tiny_sd3, shape_images, tmp_path_factory):
    """(folder, checkpoint, bundle) of a NoOp classifier trained one epoch on the tiny SDXL or SD3 folder."""
    from noop_rt.build.export import ExportOptions, collect_images, export_bundle
    from noop_rt.train.checkpoint import save_checkpoint
    from noop_rt.train.noop import TrainConfig
    from noop_rt.train.trainer import fewshot_split, train_checkpoint

    folder = {"sdxl": tiny_sdxl, "sd3": tiny_sd3}[request.param]
    backbone = load_backbone(folder)
    split = fewshot_split(shape_images, shots=2, val_shots=1, seed=0)
    ckpt, _ = train_checkpoint(backbone, split, "a {}", TrainConfig(epochs=1, batch_size=2, meta_channels=(8, 16)),
                               show_progress=False)
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    path = save_checkpoint(ckpt, root / "tiny.pt")
    options = ExportOptions(validate_images=collect_images(shape_images), images_per_batch=3)
    report = export_bundle(path, root / "bundle", options, log=io.StringIO())
    assert report.validation["passed"]
    return request.param, folder, path, root / "bundle"


def test_exported_classifier_graph_matches_torch(exported, shape_images) -> None:
    """The classifier graph on onnxruntime (image alone: class embeddings, pooled embeddings and time ids are its
    constants; the exporter folds the time ids into the UNet's time-embedding input) against the torch NoOp module,
    on the shape images."""
    import onnx
    import onnxruntime as ort

    from noop_rt.train.checkpoint import checkpoint_backbone, load_checkpoint
    from noop_rt.train.graph_modules import graph_modules

    family, _, ckpt_path, bundle = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backbone"]["family"] == family
    ckpt = load_checkpoint(ckpt_path)
    backbone = checkpoint_backbone(ckpt, ckpt_path)
    images = _images(shape_images, backbone.resolution)
    session = ort.InferenceSession(str(bundle / "classifier.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    got = session.run(["errors"], {"image": images})[0]
    with torch.no_grad():
        want = graph_modules(backbone, ckpt)["classifier"](torch.from_numpy(images), ckpt.class_embeddings)[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6)
    model = onnx.load(str(bundle / "classifier.onnx"), load_external_data=False)
    shapes = {tuple(init.dims) for init in model.graph.initializer}
    assert (len(ckpt.classes), backbone.max_tokens, backbone.text_dim) in shapes  # the class (+ pooled) embeddings
    if family == "sdxl":
        assert manifest["backbone"]["time_ids"] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    else:
        s = (ckpt.t_star + 1) / T
        assert manifest["backbone"]["sigma_t_star"] == pytest.approx(SHIFT * s / (1 + (SHIFT - 1) * s), rel=1e-6)


def test_bundle_embeds_new_prompts_as_torch_does(exported) -> None:
    """Every tokenizer of the family ships with the bundle and its text encoder graph takes their ids."""
    import noop_rt

    family, folder, _, bundle = exported
    names = ["green circle", "red square", "blue"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    want_folders = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if family == "sd3" else [])
    assert [t["folder"] for t in manifest["tokenizers"]] == want_folders
    onnx_clf = noop_rt.load(bundle, classes=names, template="a {}")
    backbone = load_backbone(folder)
    np.testing.assert_allclose(onnx_clf.model.emb, backbone.embed([f"a {n}" for n in names]).numpy(), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("method, options", [("baseline", {"pairs": 4}),
                                             ("adaptive", {"stages": ((2, 2), (4, 1))}),
                                             ("pruned", {"max_pairs": 4, "round_size": 2})])
def test_zero_shot_on_the_folder_matches_the_bundle(exported, shape_images, method, options) -> None:
    """Zero-shot strategies on the diffusers folder (torch) and on the exported bundle's scorer (onnxruntime): the
    same errors for the same seeded pairs (l2 on both: the bundle's own default is the loss NoOp trained with)."""
    import noop_rt

    _, folder, _, bundle = exported
    names = ["red square", "blue circle", "green"]
    images = _images(shape_images, 32)[:1]
    torch_clf = noop_rt.load(folder, classes=names, template="a {}", method=method, loss="l2", **options)
    onnx_clf = noop_rt.load(bundle, classes=names, template="a {}", method=method, loss="l2", **options)
    got, _ = onnx_clf.score(images)
    want, _ = torch_clf.score(images)
    assert (want.unet_evals > 0).all()
    np.testing.assert_array_equal(got.pairs_scored, want.pairs_scored)
    np.testing.assert_allclose(got.errors, want.errors, rtol=1e-4, atol=1e-6)
    results = torch_clf.classify(images)
    assert all(r.label in names for r in results)
