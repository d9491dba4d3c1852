"""Robust mode: likelihood maximisation lowers the unconditional diffusion loss and stays inside the L_inf ball."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from noop_rt.backbone import load_backbone
from noop_rt.cli import app
from noop_rt.robust import RobustConfig, likelihood_maximisation, unconditional_loss
from noop_rt.scoring import evenly_spaced_timesteps


def test_likelihood_maximisation_stays_in_the_ball_and_the_image_range(tiny_sd) -> None:
    bb = load_backbone(tiny_sd)
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.98
    cfg = RobustConfig(eta=0.1, steps=6, step_size=0.03, pairs=4)
    purified = likelihood_maximisation(bb, x, cfg)
    assert (purified - x).abs().max() <= cfg.eta + 1e-6
    assert purified.min() >= -1 and purified.max() <= 1
    assert not torch.equal(purified, x)


def test_likelihood_maximisation_lowers_the_loss_of_the_trained_demo() -> None:
    from noop_rt.demo.digits import digit_images, split_indices

    bb = load_backbone("demo")
    images, labels = digit_images()
    test = split_indices(labels)["test"][:8]
    x = torch.from_numpy(images[test]).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)  # off-manifold
    cfg = RobustConfig()
    purified = likelihood_maximisation(bb, x, cfg)
    assert (purified - x).abs().max() <= cfg.eta + 1e-6
    null = bb.embed([""])
    t = evenly_spaced_timesteps(20)
    eps = torch.randn((20, *bb.latent_shape), generator=torch.Generator().manual_seed(9))  # held-out pairs
    with torch.no_grad():
        before = unconditional_loss(bb, x, null, t, eps)
        after = unconditional_loss(bb, purified, null, t, eps)
    assert after.mean() < before.mean() and (after < before).float().mean() >= 0.75


def test_robust_flag_runs_on_torch_and_is_refused_on_bundles(tiny_ckpt, tiny_bundle, shape_images) -> None:
    img = str(next((shape_images / "red_square").iterdir()))
    runner = CliRunner()
    res = runner.invoke(app, ["classify", img, "--ckpt", str(tiny_ckpt), "--robust", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["classify", img, "--bundle", str(tiny_bundle), "--robust"])
    assert res.exit_code == 1 and "forward-only" in res.stderr
