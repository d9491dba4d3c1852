"""NoOp: learned dataset noise + meta-net, training, the checkpoint file and its errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from noop_rt.backbone import load_backbone
from noop_rt.checkpoint import load_checkpoint, save_checkpoint
from noop_rt.cli import app
from noop_rt.errors import CheckpointError
from noop_rt.noop import MetaNet, MetaNetConfig, NoiseModel, TrainConfig, encode_paths, train_noop
from noop_rt.scoring import noop_scores
from noop_rt.training import fewshot_split

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


@pytest.fixture(scope="module")
def tiny_setup(tiny_sd, shape_images):
    backbone = load_backbone(tiny_sd)
    split = fewshot_split(shape_images, shots=2, val_shots=1, seed=0)
    z = encode_paths(backbone, [p for p, _ in split.train + split.val])
    labels = torch.tensor([label for _, label in split.train + split.val])
    n = len(split.train)
    prompts = ["a " + c for c in split.classes]
    return backbone, prompts, z[:n], labels[:n], z[n:], labels[n:]


def test_training_lowers_the_loss_and_is_deterministic(tiny_setup) -> None:
    backbone, prompts, zt, yt, zv, yv = tiny_setup
    config = TrainConfig(epochs=8, batch_size=4, meta_channels=(8, 16), lr_noise=5e-2, seed=3)
    first = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config)
    losses = [h["train_loss"] for h in first.history]
    assert losses[-1] < losses[0]
    assert not torch.equal(first.noise.eps_d, torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3)))
    second = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config)
    assert torch.equal(first.noise.eps_d, second.noise.eps_d)
    assert first.tau > 0 and 1 <= first.best_epoch <= 8


@pytest.mark.parametrize("max_batch", [1, 3, 4])  # K = 2: one image per chunk, then two
def test_chunked_two_pass_gradient_equals_the_one_pass_gradient(tiny_setup, max_batch) -> None:
    """Training at a small --max-batch (SD-1.5 on 24 GB) takes the exact two-pass gradient: same loss and the same
    gradients on eps_D, the meta-net and the prompt context as one pass over the whole batch."""
    from noop_rt.noop import PromptContext, loss_and_backward

    backbone, prompts, zt, yt, *_ = tiny_setup
    backbone.requires_grad_(False)
    grads = []
    for mb in (256, max_batch):
        torch.manual_seed(0)
        meta = MetaNet(MetaNetConfig(4, (8, 16)))
        torch.nn.init.normal_(meta.out.weight, std=0.1)  # not zero: the meta-net's own gradients matter too
        noise = NoiseModel(torch.randn(4, 16, 16), meta)
        prompt = PromptContext(backbone, prompts, "a {}")
        cls = torch.stack([torch.tensor([int(y), 1 - int(y)]) for y in yt[:4]])
        loss = loss_and_backward(backbone, noise, lambda p=prompt: p.embed(backbone), zt[:4], cls,
                                 TrainConfig(max_batch=mb, loss="l1"))
        params = [noise.eps_d, *meta.parameters(), prompt.ctx]
        grads.append((loss, [q.grad.clone() for q in params]))
    (loss_a, ga), (loss_b, gb) = grads
    assert torch.allclose(loss_a, loss_b, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in ga[1:-1]) and ga[-1].abs().sum() > 0
    # fp32 UNet batches of different sizes round differently: compare relative to each gradient's scale (a bias
    # feeding a GroupNorm has a gradient that is zero up to rounding, so it is compared within the whole vector)
    flat_a, flat_b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
    assert (flat_a - flat_b).norm() <= 1e-3 * flat_a.norm()
    for a, b in ((ga[0], gb[0]), (ga[-1], gb[-1])):  # eps_D and the prompt context on their own
        assert (a - b).norm() <= 1e-3 * a.norm(), float((a - b).norm() / a.norm())


def test_prompt_tuning_learns_a_context(tiny_setup) -> None:
    backbone, prompts, zt, yt, zv, yv = tiny_setup
    config = TrainConfig(epochs=2, batch_size=4, meta_net=False, prompt_tuning=True, lr_prompt=5e-2)
    result = train_noop(backbone, prompts, "a {}", zt, yt, zv, yv, config)
    plain = backbone.embed(prompts)
    assert result.prompt is not None and result.class_embeddings.shape == plain.shape
    assert not torch.allclose(result.class_embeddings, plain)
    assert result.noise.meta_net is None


def test_noop_spends_exactly_c_unet_evaluations(tiny_setup) -> None:
    backbone, prompts, zt, *_ = tiny_setup
    calls = []

    def counting(z_t, t, emb):
        calls.append(len(z_t))
        return backbone.predict_eps(z_t, t, emb)

    emb = backbone.embed(prompts)
    with torch.no_grad():
        scores = noop_scores(counting, zt, torch.randn_like(zt), 500, emb, backbone.alphas_cumprod, max_batch=3)
    assert sum(calls) == len(zt) * len(prompts)
    assert scores.unet_evals.tolist() == [len(prompts)] * len(zt)


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


def test_checkpoint_from_another_backbone_is_refused(tiny_ckpt, tiny_sd, shape_images, tmp_path) -> None:
    from conftest import write_tiny_sd

    other = write_tiny_sd(tmp_path / "other", seed=1)
    img = next((shape_images / "red_square").iterdir())
    res = runner.invoke(app, ["classify", str(img), "--ckpt", str(tiny_ckpt), "--model", str(other)])
    assert res.exit_code == 1 and "another backbone" in res.stderr
    res = runner.invoke(app, ["classify", str(img), "--ckpt", str(tiny_ckpt), "--model", str(tiny_sd), "--json"])
    assert res.exit_code == 0, res.output


def test_eval_with_mismatched_class_folders_is_refused(tiny_ckpt, tiny_sd, tmp_path, shape_images) -> None:
    data = tmp_path / "data"
    shutil.copytree(shape_images / "red_square", data / "purple_triangle")
    res = runner.invoke(app, ["eval", "--data", str(data), "--ckpt", str(tiny_ckpt), "--model", str(tiny_sd)])
    assert res.exit_code == 1 and "not known to the classifier" in res.stderr and "purple triangle" in res.stderr


def test_classify_with_mismatched_class_folders_is_refused(tiny_ckpt, tiny_sd, tmp_path, shape_images) -> None:
    data = tmp_path / "data"
    shutil.copytree(shape_images / "red_square", data / "red_square")
    shutil.copytree(shape_images / "red_square", data / "purple_triangle")
    shutil.copytree(shape_images / "red_square", data / "blue_circel")
    img = str(next((shape_images / "red_square").iterdir()))
    res = runner.invoke(app, ["classify", img, "--data", str(data), "--ckpt", str(tiny_ckpt), "--model", str(tiny_sd)])
    assert res.exit_code == 1, res.output
    assert ("do not match the trained classes: unknown blue circel (did you mean blue circle?), purple triangle; "
            "missing blue circle") in res.stderr
    # the same class set (any order) keeps the trained embeddings; new names via --classes use the ckpt's template
    res = runner.invoke(app, ["classify", img, "--data", str(shape_images), "--ckpt", str(tiny_ckpt), "--model",
                              str(tiny_sd), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["classify", img, "--data", str(shape_images), "--ckpt", str(tiny_ckpt), "--model",
                              str(tiny_sd), "--template", "a photo of a {}", "--json"])  # same classes, new prompts
    assert res.exit_code == 0, res.output
    from noop_rt.runtime.loader import Request, open_classifier

    clf = open_classifier(Request(ckpt=tiny_ckpt, model=str(tiny_sd), classes=["purple triangle", "red square"]))
    assert clf.spec.prompts == ["a purple triangle", "a red square"] and clf.spec.class_embeddings is None


def test_cli_train_writes_a_loadable_checkpoint(tiny_sd, shape_images, tmp_path) -> None:
    out = tmp_path / "cli.pt"
    res = runner.invoke(app, ["train", "--model", str(tiny_sd), "--data", str(shape_images), "--shots", "2",
                              "--val-shots", "1", "--epochs", "1", "--batch-size", "4", "--no-meta-net",
                              "--template", "a {}", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out)
    assert ckpt.meta_net_config is None and ckpt.classes == ["blue circle", "red square"]
    assert ckpt.train["config"]["meta_net"] is False
    assert ckpt.train["options"]["shots"] == "2" and ckpt.train["options"]["meta_net"] == "False"
    res = runner.invoke(app, ["classify", str(next((shape_images / "red_square").iterdir())), "--ckpt", str(out),
                              "--model", str(tiny_sd), "--json"])
    assert res.exit_code == 0, res.output
    assert '"unet_evals": 2' in res.stdout and '"method": "noop"' in res.stdout
