"""The diffusion-classifier math as torch modules, in one place: noising, the class broadcast, v->eps, error norms.

Training runs these modules, the torch backend runs them, and `export` turns them into the bundle's ONNX graphs
(`classifier`: the whole NoOp pass; `scorer`: class errors of (z0, eps, t) rows for the zero-shot strategies), so
what is deployed is what was trained and validated.
"""

from __future__ import annotations

import torch
from torch import nn

from noop_rt.runtime.choices import LOSSES

FLOW_MATCHING = "flow_matching"  # the prediction type of a rectified-flow model (SD3): v = eps - x0


def noised(z0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (DDPM forward process); abar_t (N,) or scalar."""
    abar = abar_t.reshape(-1, *([1] * (z0.dim() - 1))) if abar_t.dim() else abar_t
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """eps from a v-prediction (Salimans & Ho 2022): eps = sqrt(abar) v + sqrt(1 - abar) z_t; abar_t (N,)."""
    abar = abar_t.reshape(-1, *([1] * (z_t.dim() - 1)))
    return abar.sqrt() * v + (1 - abar).sqrt() * z_t


def flow_noised(z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) z0 + sigma eps (rectified flow, as FlowMatchEulerDiscreteScheduler.scale_noise); sigma
    (N,)."""
    s = sigma.reshape(-1, *([1] * (z0.dim() - 1)))
    return (1 - s) * z0 + s * eps


def error_norm(pred: torch.Tensor, target: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Per-sample error in float32, mean over every axis after the first: l2 = squared, l1 = absolute, huber =
    smooth-l1 with delta 1 (as F.huber_loss). (N,)"""
    diff = pred.float() - target.float()
    if loss == "l2":
        err = diff.square()
    elif loss == "l1":
        err = diff.abs()
    elif loss == "huber":  # written out (not F.huber_loss) so every exporter and engine takes it
        a = diff.abs()
        err = torch.where(a < 1.0, 0.5 * a * a, a - 0.5)
    else:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return err.flatten(1).mean(dim=1)


class ClassErrors(nn.Module):
    """Errors of K classes for R rows of (z0, eps, t): each row's z_t is broadcast over its K class embeddings into
    ONE UNet batch of R*K (the same z_t, t and target for every class of a row: the shared noise that keeps class
    differences low-variance); the error is reduced per (row, class) in float32.

    `prediction_type` "epsilon" / "v_prediction" (DDPM, `schedule` = alphas_cumprod (T,)): z_t = noised(z0, eps,
    abar_t), the network sees t, v-predictions are turned into eps, the error is ||eps - eps_hat||.
    "flow_matching" (`schedule` = sigmas (T,), the scheduler's shifted sigmas with sigma[t] increasing in t):
    z_t = (1 - sigma_t) z0 + sigma_t eps, the network sees sigma_t * T and predicts v = eps - z0, the error is
    ||v - v_hat|| (docs/flow_matching.md: at one sigma, eps - eps_hat = (1 - sigma)(v - v_hat)).

    z0, eps (R, c, h, w); t (R,) float (integer-valued, an index into `schedule`); emb (K, L, D) shared by every row,
    or (R, K, L, D) per row (training scores each image's own negatives) -> errors (R, K), one tensor per loss in
    `losses`.
    """

    def __init__(self, unet: nn.Module, schedule: torch.Tensor, prediction_type: str,
                 losses: tuple[str, ...] = ("l2",)) -> None:
        super().__init__()
        self.unet = unet
        self.flow = prediction_type == FLOW_MATCHING
        self.register_buffer("sigmas" if self.flow else "alphas_cumprod", schedule.detach().float().clone(),
                             persistent=False)
        self.prediction_type = prediction_type
        self.losses = losses

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """eps_theta(z_t, t, emb) (N, c, h, w) float32; `t` (N,) float; v-prediction converted to eps. (DDPM)"""
        out = self._net(z_t, t.float(), emb)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t.float(), self.alphas_cumprod[t.long()])
        return out

    def _net(self, z_t: torch.Tensor, model_t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        return self.unet(z_t.to(dtype), model_t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0].float()

    def forward(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, emb: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        r = z0.shape[0]
        per_row = emb.dim() == 4
        k = emb.shape[1] if per_row else emb.shape[0]
        if self.flow:
            sigma = self.sigmas[t.long()]
            z_t = flow_noised(z0.float(), eps.float(), sigma)
            model_t, target = sigma * self.sigmas.shape[0], eps.float() - z0.float()  # v = eps - x0
        else:
            z_t = noised(z0.float(), eps.float(), self.alphas_cumprod[t.long()])  # (R, c, h, w)
            model_t, target = t.float(), eps.float()
        z_rep = z_t.unsqueeze(1).expand(r, k, *z_t.shape[1:]).reshape(r * k, *z_t.shape[1:])  # row-major (R*K, ...)
        t_rep = t.float().unsqueeze(1).expand(r, k).reshape(r * k)
        emb_rep = emb if per_row else emb.unsqueeze(0).expand(r, *emb.shape)
        emb_rows = emb_rep.reshape(r * k, *emb_rep.shape[2:])
        if self.flow:
            pred = self._net(z_rep, model_t.unsqueeze(1).expand(r, k).reshape(r * k), emb_rows)
        else:
            pred = self.predict_eps(z_rep, t_rep, emb_rows)
        target = target.unsqueeze(1).expand(r, k, *target.shape[1:]).reshape(r * k, *target.shape[1:])
        return tuple(error_norm(pred, target, loss).reshape(r, k) for loss in self.losses)


def class_errors(module: ClassErrors, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                 max_batch: int) -> torch.Tensor:
    """`module`'s first loss over rows in chunks of at most `max_batch` UNet evaluations (rows of one chunk share a
    call). Same arguments as ClassErrors.forward. (R, K)"""
    k = emb.shape[1] if emb.dim() == 4 else emb.shape[0]
    rows = max(1, max_batch // max(k, 1))
    if k > max_batch:  # one row's classes do not fit: split the classes too
        return torch.cat([class_errors(module, z0, eps, t, emb[:, j:j + max_batch] if emb.dim() == 4
                                       else emb[j:j + max_batch], max_batch) for j in range(0, k, max_batch)], dim=1)
    parts = []
    for i in range(0, z0.shape[0], rows):
        e = emb[i:i + rows] if emb.dim() == 4 else emb
        parts.append(module(z0[i:i + rows], eps[i:i + rows], t[i:i + rows], e)[0])
    return torch.cat(parts)


class NoopClassifier(nn.Module):
    """The whole NoOp pass (the bundle's `classifier` graph): image (B, 3, H, W) in [-1, 1] -> z0 (VAE encoder, or
    the pixels) -> eps = eps_D + g_phi(z0) -> z_t at t* -> broadcast over the C class embeddings -> UNet (+ v->eps)
    -> error norm -> errors (B, C) and probs = softmax(-tau * errors) (B, C), both float32."""

    def __init__(self, encoder: nn.Module, noise: nn.Module, errors: ClassErrors, t_star: int, tau: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.noise = noise
        self.errors = errors
        self.t_star = int(t_star)
        self.tau = float(tau)

    def forward(self, image: torch.Tensor, class_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0 = in_own_dtype(self.encoder, image)
        eps = in_own_dtype(self.noise, z0)
        t = torch.full((z0.shape[0],), float(self.t_star), device=z0.device)
        errors = self.errors(z0, eps, t, class_embeddings)[0]
        return errors, torch.softmax(-self.tau * errors, dim=1)


def in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` run in the module's own dtype (fp16 in an fp16 bundle), float32 in and out."""
    param = next(module.parameters(), None)
    return module(x.to(param.dtype if param is not None else x.dtype)).float()


class Float32Graph(nn.Module):
    """A module with float32 input and output whatever its own dtype: the bundle's `vae_encoder` (image -> z0) and
    `noise` (z0 -> eps_D + g_phi(z0)) graphs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_own_dtype(self.inner, x)


class TextEncoderGraph(nn.Module):
    """Token ids (N, L) int64 -> class embeddings (N, L', D) float32: the backbone's conditioner (SD 1.x/2.x: the
    text encoder's last hidden state; SDXL/SD3: `train/conditioning.py`)."""

    def __init__(self, conditioner: nn.Module) -> None:
        super().__init__()
        self.conditioner = conditioner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.conditioner(input_ids).float()
