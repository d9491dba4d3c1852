"""Temperature scaling (Guo et al. 2017) for probabilities softmax(-tau * err): fit tau on held-out errors."""

from __future__ import annotations

import torch


def fit_temperature(errors: torch.Tensor, labels: torch.Tensor, init: float | None = None,
                    prior_weight: float = 0.01) -> float:
    """tau > 0 minimising the NLL of softmax(-tau * errors) (N, C) for labels (N,) plus a weak Gaussian prior on
    log tau around 1 / (median spread of the errors); LBFGS on log tau.

    Without the prior, a validation split that is classified perfectly makes the NLL fall for ever as tau grows
    (measured on the demo: tau 1e4, every probability 1.00); with weight 0.01 tau stays finite there (155) and moves
    little where the NLL is informative (487 -> 338 with one validation error in 100)."""
    errors = errors.detach().double()
    labels = labels.detach().long()
    # Start from 1 / (typical spread of errors across classes) so LBFGS begins in a sensible range.
    spread = errors.std(dim=1).median().clamp(min=1e-12).item()
    centre = -float(torch.tensor(spread).log())
    log_tau = torch.tensor(float(torch.tensor(init).log()) if init else centre, dtype=torch.float64,
                           requires_grad=True)
    optimizer = torch.optim.LBFGS([log_tau], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(-log_tau.exp() * errors, labels)
        loss = loss + prior_weight * (log_tau - centre) ** 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_tau.detach().exp())
