"""NoOp: learned dataset noise + meta-net, the training step and its chunked gradient, validation scoring, the
checkpoint file and its errors."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from noop_rt.cli import app
from noop_rt.runtime.errors import BadInputError, CheckpointError
from noop_rt.train.backbones import load_backbone
from noop_rt.train.checkpoint import load_checkpoint, save_checkpoint
from noop_rt.train.noop import (
    MetaNet,
    MetaNetConfig,
    NoiseModel,
    PromptContext,
    TrainConfig,
    encode_paths,
    evaluate_noise,
    loss_and_backward,
    train_noop,
)
from noop_rt.train.trainer import fewshot_split

runner = CliRunner()


def test_zero_initialised_meta_net_starts_at_eps_d() -> None:
    eps_d = torch.randn(4, 16, 16)
    model = NoiseModel(eps_d, MetaNet(MetaNetConfig(4, (8, 16, 32))))
    z0 = torch.randn(3, 4, 16, 16)
    assert torch.equal(model(z0), eps_d.expand(3, -1, -1, -1))
    assert torch.equal(NoiseModel(eps_d, None)(z0), eps_d.expand(3, -1, -1, -1))


def test_meta_net_is_the_same_in_train_and_eval_mode() -> None:
    net = MetaNet(MetaNetConfig(4, (8, 16)))
    torch.nn.init.normal_(net.out.weight)
    z0 = torch.randn(2, 4, 16, 16)
    net.train()
    a = net(z0)
    net.eval()
    assert torch.allclose(a, net(z0))  # GroupNorm: no running statistics to diverge at export
    assert torch.allclose(net(z0[1:]), a[1:], rtol=1e-5, atol=1e-5)  # per image: batch neighbours change nothing


@pytest.fixture(scope="module")
def tiny_setup(tiny_sd, shape_images):
    backbone = load_backbone(tiny_sd)
    split = fewshot_split(shape_images, shots=2, val_shots=1, seed=0)
    z = encode_paths(backbone, [p for p, _ in split.train + split.val])
    labels = torch.tensor([label for _, label in split.train + split.val])
    n = len(split.train)
    prompts = ["a " + c for c in split.classes]
    return backbone, prompts, z[:n], labels[:n], z[n:], labels[n:]


@pytest.mark.slow
def test_training_lowers_the_loss_and_is_deterministic(tiny_setup) -> None:
    backbone, prompts, zt, yt, zv, yv = tiny_setup
    config = TrainConfig(epochs=3, batch_size=4, meta_channels=(8, 16), lr_noise=5e-2, seed=3)
    first = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config)
    losses = [h["train_loss"] for h in first.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not torch.equal(first.noise.eps_d, torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3)))
    second = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config)
    assert torch.equal(first.noise.eps_d, second.noise.eps_d)
    assert [h["train_loss"] for h in second.history] == losses
    assert first.tau > 0 and 1 <= first.best_epoch <= 3


def test_ctrl_c_keeps_the_best_epoch_so_far_and_every_image_pass_is_counted(tiny_setup) -> None:
    """Ctrl-C (a KeyboardInterrupt from the progress callback) in epoch 2 ends training with epoch 1 kept and tau
    fitted; in epoch 1 there is nothing to keep and it propagates. The callbacks see every training and validation
    image: the progress bar's total is reached exactly."""
    backbone, prompts, zt, yt, zv, yv = tiny_setup
    config = TrainConfig(epochs=3, batch_size=4, meta_channels=(8, 16), seed=3)
    seen = {"images": 0}

    def count(record: dict) -> None:
        seen["images"] += record.get("images", 0)

    train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config, count,
               on_validate=lambda n: seen.update(images=seen["images"] + n))
    assert seen["images"] == config.epochs * (len(zt) + len(zv)) + len(zv)

    def stop_in(epoch: int):
        def on_step(record: dict) -> None:
            if record["epoch"] == epoch and "images" in record:
                raise KeyboardInterrupt
        return on_step

    result = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config, stop_in(2))
    assert result.interrupted_in_epoch == 2 and result.best_epoch == 1 and len(result.history) == 1
    assert result.tau > 0
    with pytest.raises(KeyboardInterrupt):
        train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config, stop_in(1))


# ------------------------------------------------------------------------------------------------ the training step
def class_value(emb: torch.Tensor) -> torch.Tensor:
    """One number per text embedding (N, L, D): channel 0 averaged over the tokens (the first token alone is the same
    for every prompt: CLIP's attention is causal). (N,)"""
    return emb[:, :, 0].mean(dim=1)


class StandInUNet(nn.Module):
    """out = z_t * (1 + class_value(emb)): differentiable in z_t and the embeddings, and cheap, so many latents (or
    many chunks) can be scored."""

    def __init__(self) -> None:
        super().__init__()
        self.one = nn.Parameter(torch.ones(()), requires_grad=False)
        self.config = SimpleNamespace(sample_size=16, in_channels=4)  # the tiny SD's latent geometry

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        return (self.one * sample * (1 + class_value(encoder_hidden_states).view(-1, 1, 1, 1)),)


def backbone_of(tiny_setup, unet: str):
    backbone = tiny_setup[0].requires_grad_(False)
    return backbone if unet == "tiny-sd" else dataclasses.replace(backbone, unet=StandInUNet())


def batch_case(backbone, prompts, zt, yt):
    """Fresh parameters (meta-net output not zero, so its own gradients matter) and 3 images x K = 2 classes."""
    torch.manual_seed(0)
    meta = MetaNet(MetaNetConfig(4, (8, 16)))
    torch.nn.init.normal_(meta.out.weight, std=0.1)
    noise = NoiseModel(torch.randn(4, 16, 16), meta)
    prompt = PromptContext(backbone, prompts, "a {}")
    cls = torch.stack([torch.tensor([int(y), 1 - int(y)]) for y in yt[:3]])  # the true class at column 0
    return noise, prompt, zt[:3], cls


def parameters_of(noise: NoiseModel, prompt: PromptContext) -> list[torch.Tensor]:
    return [noise.eps_d, *noise.meta_net.parameters(), prompt.ctx]


def step_recording_unet_batches(backbone, noise, prompt, z, cls, max_batch: int):
    """loss_and_backward at `max_batch`, recording (UNet batch size, grad enabled) of every UNet call."""
    calls: list[tuple[int, bool]] = []
    hook = backbone.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((len(args[0]), torch.is_grad_enabled())), with_kwargs=True)
    try:
        loss = loss_and_backward(backbone, noise, lambda: prompt.embed(backbone), z, cls,
                                 TrainConfig(max_batch=max_batch, loss="l1", logit_scale=5.0))
    finally:
        hook.remove()
    return loss, calls


@pytest.fixture(scope="module")
def one_pass(tiny_setup):
    """The loss and gradients of loss_and_backward when the batch fits one UNet call, per UNet."""
    cache: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def get(unet: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if unet not in cache:
            backbone = backbone_of(tiny_setup, unet)
            noise, prompt, z, cls = batch_case(backbone, *tiny_setup[1:4])
            loss, calls = step_recording_unet_batches(backbone, noise, prompt, z, cls, max_batch=256)
            assert calls == [(6, True)]  # one pass: 3 images x 2 classes in one batch, with a graph
            cache[unet] = (loss, [q.grad.clone() for q in parameters_of(noise, prompt)])
        return cache[unet]

    return get


@pytest.mark.parametrize("unet", ["tiny-sd", "stand-in"])
def test_one_pass_step_is_the_cross_entropy_of_z_scored_errors(tiny_setup, one_pass, unet) -> None:
    """The loss written out: errors of each image's own classes at t*, centred per row, divided by the batch's mean
    row std (detached), logits -5 * that, cross-entropy against column 0."""
    backbone = backbone_of(tiny_setup, unet)
    noise, prompt, z, cls = batch_case(backbone, *tiny_setup[1:4])
    module = backbone.class_errors(("l1",))
    emb = prompt.embed(backbone)  # (C, L, D)
    eps = noise(z)
    t = torch.full((len(z),), 500.0)
    errors = torch.stack([module(z[i:i + 1], eps[i:i + 1], t[i:i + 1], emb[cls[i]])[0][0] for i in range(len(z))])
    centred = errors - errors.mean(dim=1, keepdim=True)
    logits = -5.0 * centred / errors.std(dim=1).mean().detach()
    loss = F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long))
    loss.backward()
    expected_loss, grads = one_pass(unet)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
    mine = [q.grad for q in parameters_of(noise, prompt)]
    flat_a, flat_b = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in mine])
    assert (flat_a - flat_b).norm() <= 1e-3 * flat_a.norm()
    for a, b in ((grads[0], mine[0]), (grads[-1], mine[-1])):  # eps_D and the prompt context on their own
        assert a.abs().sum() > 0 and (a - b).norm() <= 1e-3 * a.norm()


# K = 2 classes: max_batch 1 splits the classes of an image; 3 takes one image per chunk; 4 two images, then one
@pytest.mark.parametrize(("unet", "max_batch"), [("tiny-sd", 1), pytest.param("tiny-sd", 4, marks=pytest.mark.slow),
                                                 ("stand-in", 1), ("stand-in", 3), ("stand-in", 4)])
def test_chunked_two_pass_gradient_equals_the_one_pass_gradient(tiny_setup, one_pass, unet, max_batch) -> None:
    """Training at a small --max-batch (SD-1.5 on 24 GB) takes the exact two-pass gradient: same loss and the same
    gradients on eps_D, the meta-net and the prompt context as one pass over the whole batch."""
    backbone = backbone_of(tiny_setup, unet)
    noise, prompt, z, cls = batch_case(backbone, *tiny_setup[1:4])
    loss, calls = step_recording_unet_batches(backbone, noise, prompt, z, cls, max_batch)
    graph_calls = [n for n, grad in calls if grad]
    assert max(graph_calls) <= max_batch and sum(graph_calls) == 6  # chunks with a graph keep the limit
    loss_a, ga = one_pass(unet)
    gb = [q.grad for q in parameters_of(noise, prompt)]
    assert torch.allclose(loss_a, loss, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in ga[1:-1])
    # fp32 UNet batches of different sizes round differently: compare relative to each gradient's scale (a bias
    # feeding a GroupNorm has a gradient that is zero up to rounding, so it is compared within the whole vector)
    flat_a, flat_b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
    assert (flat_a - flat_b).norm() <= 1e-3 * flat_a.norm()
    for a, b in ((ga[0], gb[0]), (ga[-1], gb[-1])):  # eps_D and the prompt context on their own
        assert (a - b).norm() <= 1e-3 * a.norm(), float((a - b).norm() / a.norm())


def test_two_pass_step_keeps_every_unet_batch_within_max_batch(tiny_setup) -> None:
    backbone = backbone_of(tiny_setup, "stand-in")
    noise, prompt, z, cls = batch_case(backbone, *tiny_setup[1:4])
    _, calls = step_recording_unet_batches(backbone, noise, prompt, z, cls, max_batch=1)
    assert max(n for n, _ in calls) <= 1


def test_prompt_tuning_learns_a_context(tiny_setup) -> None:
    _, prompts, zt, yt, zv, yv = tiny_setup
    backbone = backbone_of(tiny_setup, "stand-in")  # the real text encoder, a cheap UNet
    config = TrainConfig(epochs=1, batch_size=4, meta_net=False, prompt_tuning=True, lr_prompt=5e-2)
    result = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config)
    plain = backbone.embed(prompts)
    assert result.prompt is not None and result.class_embeddings.shape == plain.shape
    assert not torch.allclose(result.class_embeddings, plain)
    assert result.noise.meta_net is None


# ------------------------------------------------------------------------------------------------ validation scoring
def test_evaluate_noise_takes_cpu_latents_and_returns_cpu_errors(tiny_setup) -> None:
    backbone = backbone_of(tiny_setup, "stand-in")
    gen = torch.Generator().manual_seed(2)
    z0 = torch.randn(70, 4, 16, 16, generator=gen)  # more than one chunk of 64
    labels = torch.randint(0, 3, (70,), generator=gen)
    emb = torch.tensor([0.2, -0.5, 1.1]).view(3, 1, 1).expand(3, 2, 8).contiguous()
    noise = NoiseModel(torch.randn(4, 16, 16, generator=gen), None)
    accuracy, errors = evaluate_noise(backbone, noise, emb, z0, labels, t_star=400, loss="l2", max_batch=5)
    assert errors.device.type == "cpu" and errors.shape == (70, 3)
    a = backbone.alphas_cumprod[400]
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise.eps_d  # every image, the same learned noise
    expected = torch.stack([(z_t * (1 + e) - noise.eps_d).square().flatten(1).mean(dim=1) for e in (0.2, -0.5, 1.1)],
                           dim=1)
    assert torch.allclose(errors, expected, rtol=1e-5)
    assert accuracy == pytest.approx(float((expected.argmin(dim=1) == labels).float().mean()))


# ------------------------------------------------------------------------------------------------ the checkpoint
def test_tiny_checkpoint_records_its_training(tiny_ckpt) -> None:
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt.classes == ["blue circle", "red square"] and ckpt.prompts == ["a blue circle", "a red square"]
    assert ckpt.template == "a {}" and ckpt.t_star == 500 and ckpt.loss == "l1" and ckpt.tau > 0
    assert len(ckpt.train["history"]) == 2 and 1 <= ckpt.train["best_epoch"] <= 2
    assert ckpt.meta_net_config == {"in_channels": 4, "channels": [8, 16]}
    assert not torch.equal(ckpt.eps_d, torch.zeros_like(ckpt.eps_d))


def test_checkpoint_round_trips_bit_exactly(tiny_ckpt, tmp_path) -> None:
    ckpt = load_checkpoint(tiny_ckpt)
    again = load_checkpoint(save_checkpoint(ckpt, tmp_path / "copy.pt"))
    assert torch.equal(ckpt.eps_d, again.eps_d)
    assert torch.equal(ckpt.class_embeddings, again.class_embeddings)
    for k, v in ckpt.meta_net_state.items():
        assert torch.equal(v, again.meta_net_state[k])
    assert (ckpt.classes, ckpt.t_star, ckpt.tau, ckpt.loss) == (again.classes, again.t_star, again.tau, again.loss)
    z = torch.randn(2, 4, 16, 16)
    assert torch.equal(ckpt.noise_model()(z), again.noise_model()(z))
    raw = torch.load(tiny_ckpt, weights_only=True)  # plain tensors and dicts only
    assert raw["format"] == "noop-rt.ckpt" and raw["train"]["shots_per_class"] == 2
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_bad_checkpoints_are_clear_errors(tiny_ckpt, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    data = tiny_ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a noop-rt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    raw = torch.load(tiny_ckpt, weights_only=True)
    raw["version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_checkpoint_from_another_backbone_is_refused(tiny_ckpt, tiny_sd, tiny_sd_v) -> None:
    from noop_rt.runtime.backends.torch_runner import open_checkpoint

    with pytest.raises(CheckpointError, match=r"another backbone .*: prediction_type differs"):
        open_checkpoint(tiny_ckpt, str(tiny_sd_v), "cpu", False, 256)
    _, info, emb = open_checkpoint(tiny_ckpt, str(tiny_sd), "cpu", False, 256)
    assert info.classes == ["blue circle", "red square"] and info.t_star == 500 and emb.shape[0] == 2
    assert torch.equal(torch.from_numpy(emb), load_checkpoint(tiny_ckpt).class_embeddings)


def test_class_folders_must_match_the_trained_classes(tiny_ckpt, tmp_path, shape_images) -> None:
    from noop_rt.api import LoadOptions, load

    def options(classes: list[str], **kw) -> LoadOptions:
        return LoadOptions(source=tiny_ckpt, backend="torch", device="cpu", classes=classes, **kw)

    with pytest.raises(BadInputError, match=r"do not match the trained classes: unknown blue circel \(did you mean "
                                            r"blue circle\?\), purple triangle; missing blue circle"):
        load(options(["blue circel", "purple triangle", "red square"], classes_from="DATA"))
    # the same class set in another order keeps the trained (calibrated) embeddings
    clf = load(options(["red square", "blue circle"], classes_from="DATA"))
    assert clf.class_set.trained and clf.classes == ["blue circle", "red square"]
    # new names use the checkpoint's template; a trained class keeps its cached embedding
    clf = load(options(["purple triangle", "red square"]))
    ckpt = load_checkpoint(tiny_ckpt)
    assert clf.class_set.prompts == ["a purple triangle", "a red square"] and not clf.class_set.trained
    assert clf.class_set.zero_shot == ["purple triangle"]
    assert torch.equal(torch.from_numpy(clf.class_set.embeddings[1]), ckpt.class_embeddings[1])
    new = clf.model.runner.backbone.embed(["a purple triangle"])[0]
    assert torch.allclose(torch.from_numpy(clf.class_set.embeddings[0]), new, atol=1e-6)


def test_cli_train_writes_a_loadable_checkpoint(tiny_sd, shape_images, tmp_path) -> None:
    import noop_rt

    out = tmp_path / "cli.pt"
    res = runner.invoke(app, ["train", "--model", str(tiny_sd), "--data", str(shape_images), "--shots", "2",
                              "--val-shots", "1", "--epochs", "1", "--batch-size", "4", "--no-meta-net",
                              "--template", "a {}", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out)
    assert ckpt.meta_net_config is None and ckpt.classes == ["blue circle", "red square"]
    assert ckpt.train["config"]["meta_net"] is False
    assert ckpt.train["options"]["shots"] == "2" and ckpt.train["options"]["meta_net"] == "False"
    assert not list(tmp_path.glob(".*tmp"))
    result = noop_rt.load(out, backend="torch", device="cpu").classify(
        str(next((shape_images / "red_square").iterdir())))
    assert result.method == "noop" and result.unet_evals == 2 and result.label in ckpt.classes
    assert sum(s.prob for s in result.top) == pytest.approx(1.0, abs=1e-5)


def test_train_refuses_a_bad_data_folder(tiny_sd, tmp_path) -> None:
    (tmp_path / "data" / "only_class").mkdir(parents=True)
    shutil.copy(__file__, tmp_path / "data" / "only_class" / "not_an_image.txt")
    res = runner.invoke(app, ["train", "--model", str(tiny_sd), "--data", str(tmp_path / "data"),
                              "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 1 and "no images" in res.stderr
    assert not (tmp_path / "x.pt").exists()
