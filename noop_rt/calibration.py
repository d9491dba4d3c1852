"""Temperature scaling (Guo et al. 2017) for probabilities softmax(-tau * err): fit tau on held-out errors."""

from __future__ import annotations

import torch


def fit_temperature(errors: torch.Tensor, labels: torch.Tensor, init: float | None = None) -> float:
    """tau > 0 minimising the NLL of softmax(-tau * errors) (N, C) for labels (N,); LBFGS on log tau."""
    errors = errors.detach().double()
    labels = labels.detach().long()
    # Start from 1 / (typical spread of errors across classes) so LBFGS begins in a sensible range.
    spread = errors.std(dim=1).median().clamp(min=1e-12).item()
    log_tau = torch.tensor(float(torch.tensor(init).log()) if init else -float(torch.tensor(spread).log()),
                           dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_tau], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(-log_tau.exp() * errors, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_tau.detach().exp())


def uncalibrated_tau(errors: torch.Tensor) -> torch.Tensor:
    """Per-image fallback when no fitted tau is known: 1 / std of the errors across classes. (B, 1)"""
    return 1.0 / errors.std(dim=1, keepdim=True).clamp(min=1e-12)
