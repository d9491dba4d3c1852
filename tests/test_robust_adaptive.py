"""Adaptive attacks on robust mode: gradients through the likelihood maximisation (checked against finite
differences), BPDA, the attack's L_inf ball, and RDC's sampled timesteps (reproducible by seed)."""

from __future__ import annotations

import pytest
import torch

from noop_rt.train.backbones import load_backbone
from noop_rt.train.robust import (
    AttackConfig,
    RobustConfig,
    bpda,
    likelihood_maximisation,
    margin,
    pgd,
    sample_timesteps,
    smooth_sign,
    unconditional_loss,
)


@pytest.fixture(scope="module")
def bb(tiny_sd):
    return load_backbone(tiny_sd)


def inner_image(seed: int = 0, size: int = 32) -> torch.Tensor:
    """Pixels in [-0.5, 0.5]: no [-1, 1] clip can bind within the small radii used here."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) - 0.5


def test_full_backprop_through_the_purification_matches_finite_differences(bb) -> None:
    """With smooth (plain gradient) steps the purification is a smooth function of its input; its derivative from
    create_graph=True (second order through the UNet) matches central differences, and differs clearly from the
    identity-only derivative an attack would get if the steps' dependence on the input were lost."""
    x = inner_image(0)
    cfg = RobustConfig(eta=10.0, steps=2, step_size=1.0, pairs=2, seed=3)
    null = bb.embed([""])
    probe = x.clone().requires_grad_(True)
    t = torch.tensor([300, 600])
    eps = torch.randn((2, *bb.latent_shape), generator=torch.Generator().manual_seed(0))
    (g0,) = torch.autograd.grad(unconditional_loss(bb, probe, null, t, eps).sum(), probe)
    scale = 0.05 / float(g0.abs().mean())  # steps of about 0.05 per pixel: far from every clip

    def step(g: torch.Tensor) -> torch.Tensor:
        return scale * g

    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    out = likelihood_maximisation(bb, xr, cfg, create_graph=True, sign=step)
    assert out.requires_grad
    (grad,) = torch.autograd.grad((out * w).sum(), xr)
    analytic = float((grad * v).sum())

    def f(image: torch.Tensor) -> float:
        return float((likelihood_maximisation(bb, image, cfg, sign=step).double() * w).sum())

    h = 1e-3  # converged: 3e-3 and 1e-3 agree to 0.1 % on this model, 1e-2 is still curved
    numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    identity_only = float((w * v).sum())
    assert abs(numeric - identity_only) > 0.05 * abs(numeric)  # the steps' own dependence on x is measurable...
    assert analytic == pytest.approx(numeric, rel=0.02)  # ...and the kept graph carries it


def test_exact_backprop_of_signed_steps_is_the_identity_inside_the_range(bb) -> None:
    """sign has zero derivative almost everywhere: the exact derivative of the signed-step purification is the
    identity where no [-1, 1] clip binds (why BPDA with the identity is RDC's evaluation)."""
    x = inner_image(4)
    xr = x.clone().requires_grad_(True)
    out = likelihood_maximisation(bb, xr, RobustConfig(eta=0.1, steps=2, step_size=0.03, pairs=2), create_graph=True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    (grad,) = torch.autograd.grad((out * w).sum(), xr)
    assert (out - x).abs().max() > 0.02  # the purification did move the image
    assert torch.allclose(grad, w, atol=1e-6)


def test_create_graph_gives_the_same_purified_image(bb) -> None:
    x = inner_image(6)
    cfg = RobustConfig(eta=0.1, steps=2, step_size=0.03, pairs=2)
    plain = likelihood_maximisation(bb, x, cfg)
    kept = likelihood_maximisation(bb, x.clone().requires_grad_(True), cfg, create_graph=True)
    assert torch.allclose(plain, kept.detach(), atol=1e-6)
    assert not x.requires_grad  # the caller's tensor is left alone


def test_smooth_sign_is_sign_forward_and_tanh_backward() -> None:
    g = torch.tensor([[-2.0, -0.5, 0.0, 1.0, 1.5]], requires_grad=True)
    out = smooth_sign(g)
    assert torch.equal(out.detach(), torch.sign(g.detach()))
    (grad,) = torch.autograd.grad(out.sum(), g)
    s = (2.0 + 0.5 + 0.0 + 1.0 + 1.5) / 5  # mean |g| of the sample
    expected = [(1 - torch.tanh(torch.tensor(v / s)) ** 2) / s for v in (-2.0, -0.5, 0.0, 1.0, 1.5)]
    assert torch.allclose(grad[0], torch.stack(expected), rtol=1e-5)


def test_bpda_is_the_purification_forward_and_the_identity_backward() -> None:
    x = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2).requires_grad_(True)
    out = bpda(lambda v: (v * 0.5).round(), x)  # a non-differentiable "purification"
    assert torch.equal(out.detach(), (x.detach() * 0.5).round())
    w = torch.arange(12.0).reshape(1, 3, 2, 2)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(grad, w)


def test_attack_stays_in_its_ball_and_the_image_range() -> None:
    """A loss that wants every pixel higher: PGD ends at min(x + eps, 1) exactly, never beyond."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0, 0, 0] = 1.0
    x[0, 0, 1] = 0.99
    cfg = AttackConfig()
    adv, losses = pgd(lambda a: a.sum(), x, cfg)
    assert (adv - x).abs().max() <= cfg.eps + 1e-6
    assert adv.min() >= -1 and adv.max() <= 1
    assert torch.allclose(adv, (x + cfg.eps).clamp(max=1.0), atol=1e-6)
    assert losses[-1] > losses[0]


def test_adaptive_attack_through_the_purification_stays_in_its_ball(bb) -> None:
    """PGD through the kept graph of the purification (the benchmark's `full` attack) on a two-prompt score."""
    emb = bb.embed(["red square", "blue circle"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.tensor([0, 1])
    purify_cfg = RobustConfig(eta=0.1, steps=1, step_size=0.05, pairs=1)
    t = torch.tensor([400.0, 400.0])
    eps = torch.randn((1, *bb.latent_shape), generator=torch.Generator().manual_seed(2))

    def loss(image: torch.Tensor) -> torch.Tensor:
        purified = likelihood_maximisation(bb, image, purify_cfg, create_graph=True, sign=smooth_sign)
        z0 = bb.encode(purified)
        errors = bb.class_errors(("l2",))(z0, eps.expand_as(z0), t, emb)[0]  # (2, 2)
        return margin(errors, y)

    cfg = AttackConfig(eps=0.05, steps=2, step_size=0.03)
    adv, losses = pgd(loss, x, cfg)
    assert (adv - x).abs().max() <= cfg.eps + 1e-6
    assert adv.min() >= -1 and adv.max() <= 1
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_timesteps_are_sampled_from_the_seed_as_documented(bb) -> None:
    """The UNet sees, step after step, the timesteps a generator seeded with `seed` draws (randint for t, then
    randn for the noises), inside [t_low * T, t_high * T); the same seed purifies identically, another differently."""
    cfg = RobustConfig(eta=0.1, steps=3, step_size=0.03, pairs=2, seed=7, t_low=0.2, t_high=0.6)
    seen: list[torch.Tensor] = []
    hook = bb.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    try:
        x = inner_image(8)
        first = likelihood_maximisation(bb, x, cfg)
    finally:
        hook.remove()
    gen = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(3):
        expected.append(torch.randint(200, 600, (2,), generator=gen))
        torch.randn((2, *bb.latent_shape), generator=gen)
    assert len(seen) == 3
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got.long(), want)  # one image: the UNet rows are the step's pairs
        assert ((got >= 200) & (got < 600)).all()
    assert not torch.equal(expected[0], expected[1])  # sampled per step, not a fixed grid
    assert torch.equal(first, likelihood_maximisation(bb, x, cfg))
    other = likelihood_maximisation(bb, x, RobustConfig(eta=0.1, steps=3, step_size=0.03, pairs=2, seed=8,
                                                        t_low=0.2, t_high=0.6))
    assert not torch.equal(first, other)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample_timesteps(g1, 5, 1000, cfg), sample_timesteps(g2, 5, 1000, cfg))


@pytest.mark.parametrize("low,high", [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)])
def test_bad_timestep_range_is_refused(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="t_low"):
        RobustConfig(t_low=low, t_high=high)
