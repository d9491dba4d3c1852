"""Robust mode (RDC, Chen et al. "Robust Classification via a Single Diffusion Model"): likelihood maximisation, and
the attacks that measure it.

Before classifying, move the input a few signed-gradient steps toward lower unconditional (empty-prompt) diffusion
loss E_{t, eps} ||eps - eps_theta(x_t, t, "")||^2, staying inside an L_inf ball of radius eta around the original:
an adversarial perturbation, which pushes the input off the data manifold, loses its grip. As in RDC, the
expectation is estimated afresh at every step with timesteps SAMPLED uniformly from [t_low, t_high) * T (and fresh
Gaussian noises), from a generator seeded with `seed`, so a given input is always purified the same way. Runs on the
torch backend (it needs gradients through the encoder and UNet); the exported ONNX/TensorRT graphs are forward-only.

Attacks (`pgd`): L_inf PGD on a differentiable loss of the attacked image. How the gradient passes the purification
is the caller's choice (benchmarks/robust.py):
- not at all (attack the plain classifier, then purify: non-adaptive; an upper bound on robustness);
- `bpda`: Backward Pass Differentiable Approximation with the identity, as RDC's own evaluation code does for its
  likelihood maximiser;
- full backprop: `likelihood_maximisation(..., create_graph=True)` keeps the graph of every step, including the
  gradient of the unconditional loss (a second-order path through the UNet). A signed step has zero derivative
  almost everywhere, so the exact gradient of the defence is the identity masked where the [-1, 1] clip binds; the
  attack can therefore swap in `smooth_sign` (forward: sign; backward: the derivative of tanh(g / mean|g|)), which
  lets the attacker see how the purification's steps move with the input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from noop_rt.train.backbones import Backbone

SignFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RobustConfig:
    """Likelihood maximisation. eta = 8/255 of the [0, 1] pixel range (16/255 in our [-1, 1] units, RDC's L_inf
    budget), 5 signed steps of 2/255 (so the steps can reach the ball's edge), `pairs` (t, eps) draws per step
    averaged for the unconditional loss, t uniform in [t_low, t_high) of the schedule (defaults: the whole schedule
    but its ends, where the loss carries no class or shape information), drawn with `seed`."""

    eta: float = 16 / 255  # L_inf radius in [-1, 1] image units
    steps: int = 5
    step_size: float = 4 / 255
    pairs: int = 4  # (t, eps) draws averaged per step for the unconditional loss
    seed: int = 0
    t_low: float = 0.05  # timesteps sampled uniformly from [t_low * T, t_high * T)
    t_high: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_low < self.t_high <= 1.0:
            raise ValueError(f"need 0 <= t_low < t_high <= 1, got {self.t_low}, {self.t_high}")
        if self.steps < 0 or self.pairs < 1 or self.eta < 0 or self.step_size < 0:
            raise ValueError("steps >= 0, pairs >= 1, eta >= 0 and step_size >= 0 are required")


def sample_timesteps(generator: torch.Generator, pairs: int, num_train_timesteps: int, config: RobustConfig
                     ) -> torch.Tensor:
    """`pairs` integer timesteps uniform in [t_low * T, t_high * T) (at least one value), from `generator`. (P,)"""
    low = int(config.t_low * num_train_timesteps)
    high = max(low + 1, int(config.t_high * num_train_timesteps))
    return torch.randint(low, high, (pairs,), generator=generator)


def unconditional_loss(backbone: Backbone, images: torch.Tensor, null_emb: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """Empty-prompt diffusion loss per image, averaged over the given pairs: images (B, 3, H, W), t (P,),
    eps (P, c, h, w) shared by all images. (B,)"""
    z0 = backbone.encode(images)  # (B, c, h, w), differentiable
    b, p = z0.shape[0], t.shape[0]
    rows_z0 = z0.repeat_interleave(p, dim=0)  # (B*P, c, h, w) image-major
    rows_eps = eps.to(z0.device).repeat(b, 1, 1, 1)
    rows_t = t.to(z0.device).float().repeat(b)
    errors = backbone.class_errors(("l2",))(rows_z0, rows_eps, rows_t, null_emb.to(z0.device))[0]  # (B*P, 1)
    return errors.view(b, p).mean(dim=1)


def likelihood_maximisation(backbone: Backbone, images: torch.Tensor, config: RobustConfig, *,
                            create_graph: bool = False, sign: SignFn = torch.sign) -> torch.Tensor:
    """x' = argmin_{||x' - x||_inf <= eta} L_uncond(x') by signed gradient descent, clipped to [-1, 1].

    Each step draws `pairs` timesteps (`sample_timesteps`) and noises from one generator seeded with `config.seed`;
    the draws do not depend on the images, so an image is purified the same way in any batch. `create_graph`: keep
    the whole computation differentiable with respect to `images` (full backprop through every step, second order
    through the UNet; for adaptive attacks); `sign` replaces the step's sign (e.g. `smooth_sign`)."""
    generator = torch.Generator().manual_seed(config.seed)
    null_emb = backbone.embed([""])  # (1, L, D)
    original = images.float() if create_graph else images.detach().float()
    if create_graph and not original.requires_grad:  # nothing upstream needs gradients: take the steps' anyway
        original = original.detach().clone().requires_grad_(True)
    x = original
    for _ in range(config.steps):
        t = sample_timesteps(generator, config.pairs, backbone.num_train_timesteps, config)
        eps = torch.randn((config.pairs, *backbone.latent_shape), generator=generator)
        # callers often score under no_grad/inference_mode: this step needs gradients. Keeping the graph needs the
        # math attention kernel: the fused CPU/CUDA kernels have no double backward.
        kernel = sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()
        with torch.enable_grad(), kernel:
            if not create_graph:
                x = x.detach().requires_grad_(True)
            loss = unconditional_loss(backbone, x, null_emb, t, eps).sum()
            (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
            step = x - config.step_size * sign(grad)
            x = (original + (step - original).clamp(-config.eta, config.eta)).clamp(-1.0, 1.0)
    return x if create_graph else x.detach()


class _SmoothSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale = g.detach().abs().flatten(1).mean(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        ctx.save_for_backward(g, scale)
        return torch.sign(g)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g, scale = ctx.saved_tensors
        return grad_out * (1 - torch.tanh(g / scale) ** 2) / scale


def smooth_sign(g: torch.Tensor) -> torch.Tensor:
    """sign(g) forward; backward the derivative of tanh(g / s), s = mean |g| per sample (a straight-through
    surrogate that lets an attack differentiate through signed steps). g (B, ...)."""
    return _SmoothSign.apply(g)


def bpda(purify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """purify(x) forward, identity backward (BPDA with the identity, as RDC's evaluation)."""
    with torch.no_grad():
        out = purify(x.detach())
    return x + (out - x).detach()


# ---------------------------------------------------------------------------------------------- attacks
@dataclass(frozen=True)
class AttackConfig:
    """L_inf PGD: eps = 8/255 of the [0, 1] range (16/255 in [-1, 1] units), `steps` signed steps of `step_size`,
    random start in the ball from `seed`."""

    eps: float = 16 / 255
    steps: int = 10
    step_size: float = 4 / 255
    seed: int = 0


def margin(errors: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over images of err_true - min over the other classes (CW-style on the diffusion errors; > 0 means
    misclassified). errors (B, C), y (B,) column indices."""
    true = errors.gather(1, y[:, None])[:, 0]
    others = errors.scatter(1, y[:, None], float("inf")).min(dim=1).values
    return (true - others).mean()


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, config: AttackConfig,
        on_step: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Maximise loss_fn(x_adv) over ||x_adv - x||_inf <= eps, x_adv in [-1, 1]; returns x_adv and the loss at
    every step (before its update)."""
    gen = torch.Generator().manual_seed(config.seed)
    x = x.detach().float()
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * config.eps
    delta = (x + delta).clamp(-1, 1) - x
    losses = []
    for i in range(config.steps):
        with torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            loss = loss_fn(x + delta)
            (grad,) = torch.autograd.grad(loss, delta)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(i, losses[-1])
        with torch.no_grad():
            delta = (delta + config.step_size * grad.sign()).clamp(-config.eps, config.eps)
            delta = (x + delta).clamp(-1, 1) - x
    return (x + delta).detach(), losses
