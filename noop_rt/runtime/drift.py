"""Drift warnings: is the classifier seeing images unlike its few-shot set?

NoOp's learned noise belongs to one dataset: on another domain its one-pass accuracy falls to that of a random noise,
silently. Training records what the classifier looked like on its validation split (`profile`): the 5th percentile
of the top-1 probability (low: unsure between classes) and the 95th percentile of the best class's error (high: the
model denoises the image badly whatever the prompt). At run time, `DriftMonitor` reports the share of inputs beyond
each bound, and warns once, with the retrain hint, when a sliding window holds far more inputs below the probability
bound than validation had: a one-sided test at 1e-5 per window (many windows are tested, and a held-out split differs
from a small validation split by chance: on the demo's held-out digits 6 % fall below it).

What "far more" means depends on the classes in the window. Some classes are harder than others (on the demo, 4 of
28 validation eights fall below the bound, no five does), so a stream sorted by class, as `noop-rt batch DIR` reads an
image-folder tree, fills a window with one hard class: against a flat 5 % it warned on the demo's own held-out digits
(17 of 100 in folder order). The profile therefore also counts, per predicted class, the validation images below the
bound, and each input in a window is expected below it at its predicted class's rate: the Wilson upper bound one
standard error above that count's share (a class never below it in 30 is not trusted to be that easy: 3 %). The
window's count is tested against the Poisson-binomial law of those rates. Profiles without the counts (older
checkpoints and bundles) expect 5 % of every input. Measured on the demo bundle: silent on its held-out digits
shuffled or sorted by class either way; loud on the printed, thick_affine and inverted_texture domains, shuffled or
sorted by class. The price: a window of inputs predicted as a hard class needs more below the bound to alarm (42 of 100
at the demo's hardest class, against 17 at a flat 5 %), so a mild shift is caught later. The best-error share is
reported, not alarmed on: it moves with harmless changes too (11 % on the demo's held-out digits against 5 % on
validation).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW = 100  # inputs per decision
ALARM_P = 1e-5  # tail probability of the window's count (Poisson-binomial) if the inputs were like validation
EXPECTED = 0.05  # share of validation inputs beyond each bound
WILSON_Z = 1.0  # one standard error (one-sided 84 %): a class's rate below the bound is taken at this upper bound


def wilson_upper(below: int, n: int, z: float = WILSON_Z) -> float:
    """The upper Wilson score bound of a rate seen as `below` of `n`."""
    if n <= 0:
        return EXPECTED
    p, z2 = below / n, z * z
    return float(min(1.0, (p + z2 / (2 * n) + z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)))


def poisson_binomial_tail(k: int, rates: np.ndarray) -> float:
    """P(X >= k) for X the number of successes of independent trials with these rates."""
    dist = np.ones(1)
    for p in np.asarray(rates, np.float64).tolist():
        dist = np.convolve(dist, [1.0 - p, p])
    return float(dist[k:].sum())


def profile(top1_probs: np.ndarray, best_errors: np.ndarray, predicted: np.ndarray, n_classes: int) \
        -> dict[str, Any]:
    """The validation split's confidence profile, stored in the checkpoint and the bundle manifest. `predicted`: each
    validation image's top-1 class index, of `n_classes`."""
    top1_probs, best_errors = np.asarray(top1_probs, np.float64), np.asarray(best_errors, np.float64)
    predicted = np.asarray(predicted, np.int64)
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    low_prob = float(np.quantile(top1_probs, 0.05))
    below = top1_probs < low_prob
    return {"n": len(top1_probs), "expected_share": EXPECTED,
            "top1_prob_p05": low_prob,
            "best_error_p95": float(np.quantile(best_errors, 0.95)),
            "top1_prob_quantiles": dict(zip(map(str, qs), np.quantile(top1_probs, qs).tolist(), strict=True)),
            "best_error_quantiles": dict(zip(map(str, qs), np.quantile(best_errors, qs).tolist(), strict=True)),
            # per predicted class (index order of the model's classes): validation images, and those below the bound
            "per_class_predicted": np.bincount(predicted, minlength=n_classes).tolist(),
            "per_class_below_p05": np.bincount(predicted[below], minlength=n_classes).tolist()}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@dataclass
class DriftMonitor:
    """Counts inputs beyond the validation bounds; `update` returns a one-line warning the first time a window of
    `window` inputs holds far more of them than validation did."""

    low_prob: float  # validation's 5th percentile of the top-1 probability
    high_error: float  # validation's 95th percentile of the best error
    class_rates: np.ndarray | None = None  # per predicted class, the expected share below low_prob (None: 5 %)
    window: int = WINDOW
    alarm_p: float = ALARM_P
    seen: int = 0
    below_prob: int = 0  # inputs whose top-1 probability is below the validation's 5th percentile
    above_error: int = 0  # inputs whose best error is above the validation's 95th percentile
    recent: deque = field(default_factory=deque)  # (below the bound, expected rate) of the last `window` inputs
    warned: bool = False

    @classmethod
    def from_profile(cls, prof: dict[str, Any] | None) -> DriftMonitor | None:
        if not prof or "top1_prob_p05" not in prof or "best_error_p95" not in prof:
            return None
        rates = None
        below, predicted = prof.get("per_class_below_p05"), prof.get("per_class_predicted")
        if below is not None and predicted is not None and len(below) == len(predicted) > 0:
            rates = np.array([wilson_upper(int(b), int(n)) for b, n in zip(below, predicted, strict=True)])
        return cls(float(prof["top1_prob_p05"]), float(prof["best_error_p95"]), rates)

    def _alarms(self, count: int, rates: np.ndarray) -> bool:
        if count <= float(rates.sum()):  # at or below the expectation: never in the upper tail
            return False
        return poisson_binomial_tail(count, rates) < self.alarm_p

    def update(self, top1_probs: np.ndarray, best_errors: np.ndarray, predicted: np.ndarray | None = None) \
            -> str | None:
        """Add a batch's top-1 probabilities, best errors and top-1 class indices; a warning line the first time a
        window alarms."""
        low = np.asarray(top1_probs) < self.low_prob
        high = np.asarray(best_errors) > self.high_error
        expected = np.full(len(low), EXPECTED)  # a class the profile does not count: the flat 5 %
        if self.class_rates is not None and predicted is not None:
            predicted = np.asarray(predicted, np.int64)
            known = (predicted >= 0) & (predicted < len(self.class_rates))
            expected[known] = self.class_rates[predicted[known]]
        warning = None
        for lo, hi, rate in zip(low.tolist(), high.tolist(), expected.tolist(), strict=True):
            self.seen += 1
            self.below_prob += int(lo)
            self.above_error += int(hi)
            self.recent.append((lo, rate))
            if len(self.recent) > self.window:
                self.recent.popleft()
            if self.warned or len(self.recent) < self.window:
                continue
            count = sum(b for b, _ in self.recent)
            rates = np.array([r for _, r in self.recent])
            if self._alarms(count, rates):
                self.warned = True
                warning = (f"drift: {count} of the last {self.window} images are classified with less "
                           f"confidence than 95 % of the validation images (expected at most about "
                           f"{round(float(rates.sum()))} for the classes they got); NoOp's learned noise is per "
                           "dataset, so accuracy may be far lower here: retrain on a few labelled images of this "
                           "domain (noop-rt train --data DIR --shots 8 ...) or use --method pruned")
        return warning

    def report(self) -> dict[str, Any]:
        n = max(self.seen, 1)
        return {"seen": self.seen, "share_below_val_p05_top1_prob": self.below_prob / n,
                "share_above_val_p95_best_error": self.above_error / n,
                "recent_share_below_val_p05_top1_prob":
                    sum(b for b, _ in self.recent) / len(self.recent) if self.recent else None,
                "recent_expected_share": sum(r for _, r in self.recent) / len(self.recent) if self.recent else None,
                "per_class_rates": self.class_rates is not None,
                "expected_share_each": EXPECTED, "window": self.window, "warned": self.warned,
                "bounds": {"top1_prob_p05": self.low_prob, "best_error_p95": self.high_error}}
