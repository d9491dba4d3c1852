"""Robust mode (RDC, Chen et al. "Robust Classification via a Single Diffusion Model"): likelihood maximisation.

Before classifying, move the input a few signed-gradient steps toward lower unconditional (empty-prompt) diffusion
loss, staying inside an L_inf ball of radius eta around the original: an adversarial perturbation, which pushes the
input off the data manifold, loses its grip. Runs on the torch backend (it needs gradients through the encoder and
UNet); the exported ONNX/TensorRT graphs are forward-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from noop_rt.backbone import Backbone
from noop_rt.scoring import evenly_spaced_timesteps


@dataclass(frozen=True)
class RobustConfig:
    """Defaults from RDC's likelihood maximisation where they transfer: eta = 8/255 of the [0, 1] pixel range
    (16/255 in our [-1, 1] units), a handful of signed-gradient steps."""

    eta: float = 16 / 255  # L_inf radius in [-1, 1] image units
    steps: int = 5
    step_size: float = 4 / 255
    pairs: int = 4  # (t, eps) pairs averaged per step for the unconditional loss
    seed: int = 0


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


def likelihood_maximisation(backbone: Backbone, images: torch.Tensor, config: RobustConfig) -> torch.Tensor:
    """x' = argmin_{||x' - x||_inf <= eta} L_uncond(x') by signed gradient descent, clipped to [-1, 1]."""
    generator = torch.Generator().manual_seed(config.seed)
    null_emb = backbone.embed([""])  # (1, L, D)
    t = torch.from_numpy(evenly_spaced_timesteps(config.pairs, backbone.num_train_timesteps))
    original = images.detach().float()
    x = original.clone()
    for _ in range(config.steps):
        eps = torch.randn((config.pairs, *backbone.latent_shape), generator=generator)
        with torch.enable_grad():  # callers often score under no_grad/inference_mode; this step needs gradients
            x = x.detach().requires_grad_(True)
            loss = unconditional_loss(backbone, x, null_emb, t, eps).sum()
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x - config.step_size * grad.sign()
            x = (original + (x - original).clamp(-config.eta, config.eta)).clamp(-1.0, 1.0)
    return x.detach()
