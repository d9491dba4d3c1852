"""Robust mode (RDC likelihood maximisation): stays inside the L_inf ball, lowers the unconditional diffusion loss,
works when the caller scores under torch.no_grad(), and is what the torch backend's `robust` option runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noop_rt.runtime.errors import NoopError
from noop_rt.runtime.strategies import evenly_spaced_timesteps
from noop_rt.train.backbones import load_backbone
from noop_rt.train.robust import RobustConfig, likelihood_maximisation, unconditional_loss


def test_likelihood_maximisation_under_no_grad_stays_in_the_ball_and_the_image_range(tiny_sd) -> None:
    bb = load_backbone(tiny_sd)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0, 0, :4] = 1.0  # pixels at the edge of the range must stay inside it
    x[0, 1, :4] = -1.0
    cfg = RobustConfig(eta=0.1, steps=2, step_size=0.03, pairs=2)
    with torch.no_grad():  # how a classifier calls it: the gradient step must not depend on the caller's mode
        purified = likelihood_maximisation(bb, x, cfg)
        again = likelihood_maximisation(bb, x, cfg)
        tight = likelihood_maximisation(bb, x, RobustConfig(eta=0.01, steps=2, step_size=0.03, pairs=2))
    moved = (purified - x).abs()
    assert moved.max() <= 2 * 0.03 + 1e-6  # two signed steps of 0.03, inside eta = 0.1
    assert (moved > 0.02).float().mean() > 0.5  # and most pixels did move
    assert purified.min() >= -1 and purified.max() <= 1
    assert torch.equal(purified, again)  # seeded: the same input gives the same output
    assert not purified.requires_grad
    assert (tight - x).abs().max() == pytest.approx(0.01, abs=1e-6)  # a step larger than eta is clipped to eta


def test_likelihood_maximisation_lowers_the_loss_of_the_trained_demo() -> None:
    from noop_rt.demo.digits import digit_images, split_indices

    bb = load_backbone("demo")
    images, labels = digit_images()
    test = split_indices(labels)["test"][:4]
    x = torch.from_numpy(images[test]).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)  # off-manifold
    cfg = RobustConfig(steps=3, pairs=2)  # the default radius and step size, fewer steps (time)
    with torch.no_grad():
        purified = likelihood_maximisation(bb, x, cfg)
    assert (purified - x).abs().max() <= cfg.eta + 1e-6
    null = bb.embed([""])
    t = torch.from_numpy(evenly_spaced_timesteps(10))
    eps = torch.randn((10, *bb.latent_shape), generator=torch.Generator().manual_seed(9))  # held-out pairs
    with torch.no_grad():
        before = unconditional_loss(bb, x, null, t, eps)
        after = unconditional_loss(bb, purified, null, t, eps)
    assert (after < before).all()


def test_unconditional_loss_is_the_empty_prompt_error_averaged_over_pairs(tiny_sd) -> None:
    bb = load_backbone(tiny_sd)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    null = bb.embed([""])
    t = torch.tensor([100, 700])
    eps = torch.randn((2, *bb.latent_shape), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = unconditional_loss(bb, x, null, t, eps)
        z0 = bb.encode(x)
        expected = torch.zeros(2)
        for i in range(2):
            for j in range(2):
                a = bb.alphas_cumprod[int(t[j])]
                z_t = a.sqrt() * z0[i] + (1 - a).sqrt() * eps[j]
                pred = bb.unet(z_t[None], t[j:j + 1].float(), encoder_hidden_states=null).sample[0]
                expected[i] += (pred - eps[j]).square().mean() / 2
    assert torch.allclose(got, expected, rtol=1e-4)


def test_robust_option_purifies_before_scoring_on_torch(tiny_ckpt, shape_images) -> None:
    import noop_rt
    from noop_rt.runtime.images import as_model_input

    clf = noop_rt.load(tiny_ckpt, backend="torch", device="cpu")
    paths = sorted((shape_images / "red_square").iterdir())[:2]
    images = np.stack([as_model_input(p, clf.resolution) for p in paths])
    cfg = RobustConfig(eta=0.1, steps=1, step_size=0.05, pairs=1)
    robust, _ = clf.score(images, robust=cfg)
    purified = likelihood_maximisation(clf.model.runner.backbone, torch.from_numpy(images), cfg).numpy()
    by_hand, _ = clf.score(purified)
    plain, _ = clf.score(images)
    assert np.allclose(robust.errors, by_hand.errors, rtol=1e-5)
    assert not np.allclose(robust.errors, plain.errors, rtol=1e-5)


def test_robust_mode_is_refused_on_forward_only_bundles() -> None:
    import noop_rt
    from noop_rt.demo import BUNDLE_DIR

    with pytest.raises(NoopError, match="--robust needs the torch backend"):
        noop_rt.load(BUNDLE_DIR, robust=RobustConfig())
    clf = noop_rt.load(BUNDLE_DIR, backend="onnxruntime", device="cpu")
    images = np.zeros((1, 3, clf.resolution, clf.resolution), np.float32)
    with pytest.raises(NoopError, match="forward-only"):
        clf.score(images, robust=RobustConfig())
