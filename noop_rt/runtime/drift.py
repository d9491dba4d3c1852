"""Drift warnings: is the classifier seeing images unlike its few-shot set?

NoOp's learned noise belongs to one dataset: on another domain its one-pass accuracy falls to that of a random noise,
silently. Training records what the classifier looked like on its validation split (`profile`): the 5th percentile
of the top-1 probability (low: unsure between classes) and the 95th percentile of the best class's error (high: the
model denoises the image badly whatever the prompt). At run time, `DriftMonitor` reports the share of inputs beyond
each bound, and warns once, with the retrain hint, when a sliding window holds far more inputs below the probability
bound than the 5 % validation had: a one-sided binomial test at 1e-5 per window (many windows are tested, and a
held-out split differs from a small validation split by chance: on the demo's held-out digits 6 % fall below it).
The best-error share is reported, not alarmed on: it moves with harmless changes too (11 % on the demo's held-out
digits against 5 % on validation).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW = 100  # inputs per decision
ALARM_P = 1e-5  # binomial tail probability of the window's count if the inputs were like validation
EXPECTED = 0.05  # share of validation inputs beyond each bound


def profile(top1_probs: np.ndarray, best_errors: np.ndarray) -> dict[str, Any]:
    """The validation split's confidence profile, stored in the checkpoint and the bundle manifest."""
    top1_probs, best_errors = np.asarray(top1_probs, np.float64), np.asarray(best_errors, np.float64)
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    return {"n": len(top1_probs), "expected_share": EXPECTED,
            "top1_prob_p05": float(np.quantile(top1_probs, 0.05)),
            "best_error_p95": float(np.quantile(best_errors, 0.95)),
            "top1_prob_quantiles": dict(zip(map(str, qs), np.quantile(top1_probs, qs).tolist(), strict=True)),
            "best_error_quantiles": dict(zip(map(str, qs), np.quantile(best_errors, qs).tolist(), strict=True))}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@dataclass
class DriftMonitor:
    """Counts inputs beyond the validation bounds; `update` returns a one-line warning the first time a window of
    `window` inputs holds far more of them than validation did."""

    low_prob: float  # validation's 5th percentile of the top-1 probability
    high_error: float  # validation's 95th percentile of the best error
    window: int = WINDOW
    alarm_p: float = ALARM_P
    seen: int = 0
    below_prob: int = 0  # inputs whose top-1 probability is below the validation's 5th percentile
    above_error: int = 0  # inputs whose best error is above the validation's 95th percentile
    recent: deque = field(default_factory=deque)
    warned: bool = False

    @classmethod
    def from_profile(cls, prof: dict[str, Any] | None) -> DriftMonitor | None:
        if not prof or "top1_prob_p05" not in prof or "best_error_p95" not in prof:
            return None
        return cls(float(prof["top1_prob_p05"]), float(prof["best_error_p95"]))

    def threshold(self) -> int:
        """The smallest count of inputs below the probability bound in a full window that a validation-like
        stream (5 % below) reaches with probability below `alarm_p` (17 of 100)."""
        return next(k for k in range(self.window + 1) if binomial_tail(k, self.window, EXPECTED) < self.alarm_p)

    def update(self, top1_probs: np.ndarray, best_errors: np.ndarray) -> str | None:
        """Add a batch's top-1 probabilities and best errors; a warning line the first time a window alarms."""
        low = np.asarray(top1_probs) < self.low_prob
        high = np.asarray(best_errors) > self.high_error
        warning = None
        limit = self.threshold()
        for lo, hi in zip(low.tolist(), high.tolist(), strict=True):
            self.seen += 1
            self.below_prob += int(lo)
            self.above_error += int(hi)
            self.recent.append(lo)
            if len(self.recent) > self.window:
                self.recent.popleft()
            if not self.warned and len(self.recent) == self.window and sum(self.recent) >= limit:
                self.warned = True
                warning = (f"drift: {sum(self.recent)} of the last {self.window} images are classified with less "
                           f"confidence than 95 % of the validation images (expected about "
                           f"{round(EXPECTED * self.window)}); NoOp's learned noise is per "
                           "dataset, so accuracy may be far lower here: retrain on a few labelled images of this "
                           "domain (noop-rt train --data DIR --shots 8 ...) or use --method pruned")
        return warning

    def report(self) -> dict[str, Any]:
        n = max(self.seen, 1)
        return {"seen": self.seen, "share_below_val_p05_top1_prob": self.below_prob / n,
                "share_above_val_p95_best_error": self.above_error / n,
                "recent_share_below_val_p05_top1_prob": sum(self.recent) / len(self.recent) if self.recent else None,
                "expected_share_each": EXPECTED, "window": self.window, "warned": self.warned,
                "bounds": {"top1_prob_p05": self.low_prob, "best_error_p95": self.high_error}}
