"""Diffusion-classifier strategies: numpy bookkeeping over (rows, C) class errors, one signature, one registry.

Every strategy is `fn(model, images, config) -> Scores`, where `model` is any `ScoringModel` (the onnxruntime,
OpenVINO, TensorRT and torch backends all are, through `runtime/graph_model.py`) and `config` a frozen dataclass of that
strategy's keyword-only options. The model computes errors; this module decides which (t, eps) pairs and classes to
score, averages pairs, runs Li et al.'s stages and Clark & Jaini's paired t-test, and turns errors into
probabilities. Every class of a pair is scored with the SAME (t, eps) (shared noise keeps class differences
low-variance). No torch here: the runtime imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from noop_rt.runtime.choices import ESCALATIONS, LOSSES, METHODS  # noqa: F401 - METHODS: the registry's names
from noop_rt.runtime.errors import BadInputError

Progress = Callable[[int], None] | None

# Li et al.'s published adaptive schedules (their commands.md: --n_samples per stage, --to_keep after it).
PUBLISHED_STAGES: dict[str, tuple[tuple[int, int], ...]] = {
    "pets": ((25, 5), (250, 1)),
    "cifar10": ((50, 5), (500, 1)),
    "stl10": ((100, 5), (500, 1)),
    "food": ((20, 20), (50, 10), (100, 5), (500, 1)),
    "flowers": ((20, 20), (50, 10), (100, 5), (500, 1)),
    "aircraft": ((20, 20), (50, 10), (100, 5), (500, 1)),
    "imagenet": ((50, 500), (100, 50), (500, 10), (1000, 1)),
    "objectnet": ((50, 25), (100, 10), (500, 5), (1000, 1)),
}
PUBLISHED_LOSS = "l1"  # every command of Li et al.'s commands.md passes --loss l1: a named setting brings it


class ScoringModel(Protocol):
    """What a strategy needs from a model. Arrays are numpy float32; errors are (rows, classes)."""

    num_classes: int
    latent_shape: tuple[int, int, int]  # (c, h, w) of z0
    num_train_timesteps: int

    def noop_errors(self, images: np.ndarray, loss: str) -> np.ndarray:
        """NoOp's one pass, eps = eps_D + g_phi(z0) at t*: images (B, 3, H, W) in [-1, 1] -> errors (B, C)."""
        ...

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images (B, 3, H, W) in [-1, 1] -> z0 (B, c, h, w)."""
        ...

    def class_errors(self, z0: np.ndarray, eps: np.ndarray, t: np.ndarray, classes: np.ndarray | None, loss: str,
                     progress: Progress = None) -> np.ndarray:
        """Rows of (z0, eps, t) (R, c, h, w), (R, c, h, w), (R,) scored against `classes` (K,) indices (None: all)
        -> errors (R, K). Each row's z_t is shared by all K classes."""
        ...


# ---------------------------------------------------------------------------------------------- grids and noise
def evenly_spaced_timesteps(n: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Li et al.'s grid: n timesteps evenly spaced over [0, T), offset by half a step (n=1 -> [500]). (n,) int64"""
    n = max(1, min(n, num_train_timesteps))
    step = num_train_timesteps // n
    return np.arange(step // 2, num_train_timesteps, step, dtype=np.int64)[:n]


def noise_bank(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """n standard-normal noises (n, *shape) float32 from numpy's PCG64 seeded with `seed`; shared by every image
    and class. (Pass `noises=` to a strategy to use another bank, e.g. the one a published run saved.)"""
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    """`25:5,250:1` -> ((25, 5), (250, 1)); a published name (`pets`, `food`, `imagenet`, `stl10`) also works."""
    if text.strip().lower() in PUBLISHED_STAGES:
        return PUBLISHED_STAGES[text.strip().lower()]
    stages = []
    for part in text.split(","):
        pairs, sep, keep = part.strip().partition(":")
        if not sep or not pairs.strip().isdigit() or not keep.strip().isdigit():
            raise ValueError(f"bad stage {part.strip()!r}: write PAIRS:KEEP, e.g. 25:5,250:1 (or one of "
                             f"{', '.join(PUBLISHED_STAGES)})")
        stages.append((int(pairs), int(keep)))
    check_stages(tuple(stages))
    return tuple(stages)


def check_stages(stages: tuple[tuple[int, int], ...]) -> None:
    counts = [p for p, _ in stages]
    if not stages or counts != sorted(counts) or counts[0] < 1 or any(k < 1 for _, k in stages):
        raise ValueError(f"adaptive stages need increasing pair counts >= 1 and keep >= 1, got "
                         f"{','.join(f'{p}:{k}' for p, k in stages)}")


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Scores:
    """What every strategy returns, per image: mean error per class and how many pairs each class was scored on."""

    errors: np.ndarray  # (B, C) float64 mean error over the pairs the class was scored on
    pairs_scored: np.ndarray  # (B, C) int64
    unet_evals: np.ndarray  # (B,) int64 UNet evaluations spent on each image
    alive: np.ndarray | None = None  # (B, C) bool classes not eliminated; None: all (baseline, noop)
    # cascade only: which images went past NoOp, and NoOp's errors for every image (what drift is judged on)
    escalated: np.ndarray | None = None  # (B,) bool
    stage1: np.ndarray | None = None  # (B, C) float64

    @property
    def survivors(self) -> np.ndarray:
        """(B, C) bool: classes never eliminated (all for `baseline`/`noop`; the finalists for `adaptive`)."""
        return self.alive if self.alive is not None else np.ones(self.errors.shape, dtype=bool)

    def predictions(self) -> np.ndarray:
        """argmin of the mean error among survivors. (B,) int64"""
        return np.where(self.survivors, self.errors, np.inf).argmin(axis=1)

    def probabilities(self, tau: float | np.ndarray) -> np.ndarray:
        """softmax(-tau * err) over the survivors; eliminated classes get 0. (B, C)"""
        return softmax(np.where(self.survivors, -np.asarray(tau) * self.errors, -np.inf))

    def ranking(self) -> np.ndarray:
        """Classes best first: survivors, then more pairs scored, then lower error. (B, C) int64"""
        return np.lexsort((self.errors, -self.pairs_scored, ~self.survivors), axis=1)

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        alive = None if all(p.alive is None for p in parts) else np.concatenate([p.survivors for p in parts])
        cascaded = all(p.escalated is not None for p in parts)
        return cls(np.concatenate([p.errors for p in parts]), np.concatenate([p.pairs_scored for p in parts]),
                   np.concatenate([p.unet_evals for p in parts]), alive,
                   np.concatenate([p.escalated for p in parts]) if cascaded else None,  # type: ignore[misc]
                   np.concatenate([p.stage1 for p in parts]) if cascaded else None)  # type: ignore[misc]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax; -inf entries get probability 0. (B, C)"""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def uncalibrated_tau(errors: np.ndarray) -> np.ndarray:
    """Per-image fallback when no fitted tau applies: 1 / std of the errors across classes. (B, 1)"""
    if errors.shape[1] < 2:  # one class: its probability is 1 whatever the scale
        return np.ones((errors.shape[0], 1))
    return 1.0 / np.maximum(errors.std(axis=1, ddof=1, keepdims=True), 1e-12)


def paired_t_pvalues(per_pair: np.ndarray, best: int) -> np.ndarray:
    """One-sided paired t-test per class against column `best` ("class k is no worse than best"), over the rows
    (pairs) of `per_pair` (n, K): the same p-values as scipy.stats.ttest_rel(per_pair[:, k], per_pair[:, best],
    alternative="greater"); 1.0 for `best` itself and for classes whose differences are all zero."""
    from scipy.stats import t as student_t

    n = per_pair.shape[0]
    diff = per_pair - per_pair[:, best:best + 1]
    mean, std = diff.mean(axis=0), diff.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_stat = mean / (std / np.sqrt(n))
    p = student_t.sf(t_stat, df=n - 1)
    return np.where(std > 0, p, np.where(mean > 0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------- strategy configs
@dataclass(frozen=True, kw_only=True)
class NoopConfig:
    """NoOp: ONE (t*, eps_D + g_phi(z0)) pair per image; C UNet evaluations. `loss` None: the model's own."""

    loss: str | None = None


@dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """Li et al.'s diffusion classifier: `pairs` (t, eps), t evenly spaced, eps ~ N(0, I) shared by all classes."""

    pairs: int = 100
    seed: int = 0
    loss: str | None = None
    noises: np.ndarray | None = field(default=None, compare=False)  # (pairs, c, h, w) instead of seeded draws

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"baseline needs at least one (t, eps) pair, got {self.pairs}")


@dataclass(frozen=True, kw_only=True)
class AdaptiveConfig:
    """Li et al.'s adaptive evaluation: per stage, score the surviving classes on `pairs` pairs in total (nested,
    evenly spaced timesteps), keep the `keep` lowest mean errors. Default: their Pets setting (25 keep 5, then 250
    keep 1)."""

    stages: tuple[tuple[int, int], ...] = PUBLISHED_STAGES["pets"]
    seed: int = 0
    loss: str | None = None
    noises: np.ndarray | None = field(default=None, compare=False)  # (max pairs, c, h, w)

    def __post_init__(self) -> None:
        check_stages(tuple(self.stages))


@dataclass(frozen=True, kw_only=True)
class PrunedConfig:
    """Clark & Jaini's successive elimination: rounds of `round_size` shared pairs; drop a class once a paired
    t-test against the current best rejects it at `alpha`; stop at one class or `max_pairs`."""

    max_pairs: int = 100
    round_size: int = 5
    alpha: float = 0.01
    seed: int = 0
    loss: str | None = None
    noises: np.ndarray | None = field(default=None, compare=False)  # (max_pairs, c, h, w)

    def __post_init__(self) -> None:
        if self.max_pairs < 2 or self.round_size < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"pruned needs max_pairs >= 2, round_size >= 1 and 0 < alpha < 1; got max_pairs "
                             f"{self.max_pairs}, round_size {self.round_size}, alpha {self.alpha}")


# the cascade's defaults where a checkpoint or bundle has no fitted ones (before 0.4); `train` fits its own
DEFAULT_CASCADE_THRESHOLD = 0.99
DEFAULT_SHORTLIST = 5
DEFAULT_ESCALATE = "pruned"
ZERO_SHOT_LOSS = "l2"  # the escalation's loss unless --loss says otherwise: the zero-shot strategies' default

@dataclass(frozen=True, kw_only=True)
class CascadeConfig:
    """NoOp first, the zero-shot `escalate` strategy only where NoOp is unsure or the image is unfamiliar.

    An image is answered by NoOp (C evaluations) when its stage-1 top-1 probability softmax(-tau * err) reaches
    `cascade_threshold` and its best stage-1 error is within `error_bound` (validation's high quantile of it: off its
    training domain NoOp is confidently wrong, but it denoises the image worse whatever the prompt). Otherwise the
    image's shortlist goes to `escalate` over the same scorer: for a familiar image the fewest best stage-1 classes
    whose probabilities sum to `cascade_threshold` (2 to `shortlist` of them), for an unfamiliar one the `shortlist`
    best (its probabilities mean little there). The other classes are ruled out and never scored again.
    `tau`: NoOp's fitted temperature (None: the per-image 1/std scale); `error_bound` None: no familiarity test;
    `escalation`: the escalation strategy's own config (None: its defaults with the l2 error, the zero-shot
    default; `loss` is stage 1's)."""

    cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD
    shortlist: int = DEFAULT_SHORTLIST
    escalate: str = DEFAULT_ESCALATE
    loss: str | None = None
    tau: float | None = None
    error_bound: float | None = None
    escalation: BaselineConfig | AdaptiveConfig | PrunedConfig | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.cascade_threshold <= 1:
            raise ValueError(f"the cascade threshold is a probability in (0, 1], got {self.cascade_threshold}")
        if self.shortlist < 2:
            raise ValueError(f"the cascade's shortlist needs at least 2 classes, got {self.shortlist}")
        if self.escalate not in ESCALATIONS:
            raise ValueError(f"cascade escalates to one of {', '.join(ESCALATIONS)}, not {self.escalate!r}")


StrategyConfig = NoopConfig | BaselineConfig | AdaptiveConfig | PrunedConfig | CascadeConfig


def _noises(config: Any, n: int, model: ScoringModel) -> np.ndarray:
    if config.noises is not None:
        bank = np.asarray(config.noises, dtype=np.float32)
        if bank.shape[0] < n or tuple(bank.shape[1:]) != tuple(model.latent_shape):
            raise BadInputError(f"the given noise bank has shape {bank.shape}; this run needs ({n}, "
                             f"{', '.join(map(str, model.latent_shape))})")
        return bank[:n]
    return noise_bank(n, tuple(model.latent_shape), config.seed)


# ---------------------------------------------------------------------------------------------- strategies
def noop(model: ScoringModel, images: np.ndarray, config: NoopConfig, progress: Progress = None) -> Scores:
    """NoOp: exactly C UNet evaluations per image."""
    b, c = len(images), model.num_classes
    errors = model.noop_errors(images, _loss(config))
    if progress is not None:
        progress(b * c)
    return Scores(errors.astype(np.float64), np.ones((b, c), np.int64), np.full(b, c, np.int64))


def baseline(model: ScoringModel, images: np.ndarray, config: BaselineConfig, progress: Progress = None) -> Scores:
    """Every class on the same `pairs` (t, eps); errors averaged over pairs."""
    z0 = model.encode(images)
    b, c = len(z0), model.num_classes
    ts = evenly_spaced_timesteps(config.pairs, model.num_train_timesteps)
    n = len(ts)
    eps = _noises(config, n, model)
    rows_z0 = np.repeat(z0, n, axis=0)  # (B*P, c, h, w) image-major
    rows_eps = np.tile(eps, (b, 1, 1, 1))
    rows_t = np.tile(ts, b)
    errors = model.class_errors(rows_z0, rows_eps, rows_t, None, _loss(config), progress).reshape(b, n, c)
    return Scores(errors.astype(np.float64).mean(axis=1), np.full((b, c), n, np.int64), np.full(b, n * c, np.int64))


def adaptive(model: ScoringModel, images: np.ndarray, config: AdaptiveConfig, progress: Progress = None) -> Scores:
    """Li et al.'s `eval_prob_adaptive`: stage s scores the survivors on the timesteps of its own evenly spaced
    subset of the finest grid not scored yet; the k-th timestep scored for an image takes noise k (as their code
    indexes noise by evaluation order); keep the `keep` lowest mean errors."""
    check_stages(tuple(config.stages))
    z0 = model.encode(images)
    grid = evenly_spaced_timesteps(config.stages[-1][0], model.num_train_timesteps)
    eps = _noises(config, len(grid), model)
    b, c = len(z0), model.num_classes
    sums = np.zeros((b, c))
    pairs_scored = np.zeros((b, c), np.int64)
    evals = np.zeros(b, np.int64)
    finalists = np.zeros((b, c), bool)
    for i in range(b):
        alive = np.arange(c)
        done: list[int] = []
        for pairs, keep in config.stages:
            finalists[i] = False
            finalists[i, alive] = True
            stride = max(1, len(grid) // pairs)
            slots = [s for s in range(stride // 2, len(grid), stride)[:pairs] if s not in done]
            if slots:
                first = len(done)
                noise = eps[first:first + len(slots)]
                err = model.class_errors(np.repeat(z0[i:i + 1], len(slots), axis=0), noise, grid[slots], alive,
                                         _loss(config), progress)  # (P, K)
                sums[i, alive] += err.astype(np.float64).sum(axis=0)
                pairs_scored[i, alive] += len(slots)
                evals[i] += len(slots) * len(alive)
                done += slots
            mean = sums[i, alive] / pairs_scored[i, alive]
            alive = alive[np.argsort(mean, kind="stable")[:max(1, min(keep, len(alive)))]]
    errors = sums / np.maximum(pairs_scored, 1)
    return Scores(errors, pairs_scored, evals, finalists)


def pruned(model: ScoringModel, images: np.ndarray, config: PrunedConfig, progress: Progress = None) -> Scores:
    """Rounds of `round_size` shared pairs (timesteps from a seeded permutation of the evenly spaced grid); after
    each, drop every class whose paired t-test against the current best rejects at `alpha`."""
    z0 = model.encode(images)
    grid = evenly_spaced_timesteps(config.max_pairs, model.num_train_timesteps)
    order = np.random.default_rng(config.seed + 1).permutation(len(grid))
    eps = _noises(config, len(grid), model)
    b, c = len(z0), model.num_classes
    errors = np.zeros((b, c))
    pairs_scored = np.zeros((b, c), np.int64)
    evals = np.zeros(b, np.int64)
    survivors = np.zeros((b, c), bool)
    for i in range(b):
        alive = np.arange(c)
        per_pair = np.zeros((len(grid), c))  # errors of the pairs scored so far
        used = 0
        while used < len(grid) and len(alive) > 1:
            slots = order[used:used + config.round_size]
            err = model.class_errors(np.repeat(z0[i:i + 1], len(slots), axis=0), eps[slots], grid[slots], alive,
                                     _loss(config), progress)
            per_pair[used:used + len(slots), alive] = err
            pairs_scored[i, alive] += len(slots)
            evals[i] += len(slots) * len(alive)
            used += len(slots)
            if used < 2:
                continue
            scores = per_pair[:used, alive]
            best = int(scores.mean(axis=0).argmin())
            keep = paired_t_pvalues(scores, best) >= config.alpha
            keep[best] = True
            alive = alive[keep]
        errors[i] = per_pair[:used].sum(axis=0) / np.maximum(pairs_scored[i], 1)
        survivors[i, alive] = True
    return Scores(errors, pairs_scored, evals, survivors)


def confidence_set(probs: np.ndarray, threshold: float, cap: int) -> np.ndarray:
    """One image's shortlist: its classes best first (stage-1 probabilities (C,)) until their probabilities sum to
    `threshold`, then clipped to 2..`cap` classes (never more than there are). (K,) int64 class indices"""
    order = np.argsort(-probs, kind="stable")
    needed = len(order) if threshold >= 1 else int(np.searchsorted(np.cumsum(probs[order]), threshold)) + 1
    return order[:min(len(order), max(2, min(needed, cap)))]


class _Shortlisted:
    """A `ScoringModel` view of one image's shortlisted classes, its z0 already encoded: the escalation strategy
    runs on it unchanged, and its class indices map back to the model's."""

    def __init__(self, model: ScoringModel, classes: np.ndarray, z0: np.ndarray) -> None:
        self.model, self.classes, self.z0 = model, classes, z0
        self.num_classes = len(classes)
        self.latent_shape = model.latent_shape
        self.num_train_timesteps = model.num_train_timesteps

    def noop_errors(self, images: np.ndarray, loss: str) -> np.ndarray:
        raise NotImplementedError("a cascade escalates to a zero-shot strategy")

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.z0

    def class_errors(self, z0: np.ndarray, eps: np.ndarray, t: np.ndarray, classes: np.ndarray | None, loss: str,
                     progress: Progress = None) -> np.ndarray:
        picked = self.classes if classes is None else self.classes[np.asarray(classes)]
        return self.model.class_errors(z0, eps, t, picked, loss, progress)


def cascade(model: ScoringModel, images: np.ndarray, config: CascadeConfig, progress: Progress = None) -> Scores:
    """NoOp's pass for every image; the images below the threshold escalate on their shortlist (encoded once, in one
    call). Escalated rows hold the escalation's errors and survivors on the shortlist; the classes NoOp ruled out keep
    their stage-1 error, one pair, and are not survivors."""
    b, c = len(images), model.num_classes
    stage1 = model.noop_errors(images, _loss(config)).astype(np.float64)
    if progress is not None:
        progress(b * c)
    tau = uncalibrated_tau(stage1) if config.tau is None else config.tau
    probs = softmax(-np.asarray(tau) * stage1)
    familiar = (np.ones(b, bool) if config.error_bound is None
                else stage1.min(axis=1) <= config.error_bound)
    escalated = (probs.max(axis=1) < config.cascade_threshold) | ~familiar
    errors, pairs_scored = stage1.copy(), np.ones((b, c), np.int64)
    evals, alive = np.full(b, c, np.int64), np.ones((b, c), bool)
    rows = np.flatnonzero(escalated)
    if len(rows):
        z0 = model.encode(images[rows])
        strategy = STRATEGIES[config.escalate]
        escalation = config.escalation or strategy.config(loss=ZERO_SHOT_LOSS)
        for j, i in enumerate(rows.tolist()):
            short = confidence_set(probs[i], config.cascade_threshold if familiar[i] else 1.0, config.shortlist)
            sub = strategy.fn(_Shortlisted(model, short, z0[j:j + 1]), images[i:i + 1], escalation, progress)
            errors[i, short] = sub.errors[0]
            pairs_scored[i, short] = sub.pairs_scored[0]
            alive[i] = False
            alive[i, short] = sub.survivors[0]
            evals[i] += sub.unet_evals[0]
    return Scores(errors, pairs_scored, evals, alive, escalated, stage1)


def _loss(config: Any) -> str:
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}")
    return config.loss


@dataclass(frozen=True)
class Strategy:
    fn: Callable[..., Scores]
    config: type
    summary: str


STRATEGIES: dict[str, Strategy] = {
    "noop": Strategy(noop, NoopConfig, "one pass at t* with the learned noise (C UNet evals)"),
    "baseline": Strategy(baseline, BaselineConfig, "N evenly spaced (t, eps) pairs for every class (N*C evals)"),
    "adaptive": Strategy(adaptive, AdaptiveConfig, "Li et al.'s stages: few pairs for all, more for the best"),
    "pruned": Strategy(pruned, PrunedConfig, "Clark & Jaini: drop classes a paired t-test rejects"),
    "cascade": Strategy(cascade, CascadeConfig, "NoOp first; only images it is unsure of go to a zero-shot strategy, "
                        "on the classes it could not rule out"),
}


# the strategy options `noop_rt.load` and `classify` take: every config's fields (but those the classifier fills in),
# `pairs` for all, and robust mode
_FILLED_IN = {"tau", "error_bound", "escalation"}
OPTIONS = tuple(sorted({f for s in STRATEGIES.values() for f in s.config.__dataclass_fields__ if f not in _FILLED_IN}
                       | {"pairs", "robust"}))


def make_config(method: str, **options: Any) -> StrategyConfig:
    """The config of `method` from the options it takes (others, and None values, are ignored)."""
    cls = STRATEGIES[method].config
    names = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in options.items() if k in names and v is not None})


def protocol(method: str, config: StrategyConfig, num_train_timesteps: int, t_star: int | None = None
             ) -> dict[str, Any]:
    """Everything that fixes a strategy's result, for eval --json and benchmark records (reproducibility)."""
    out: dict[str, Any] = {"method": method, **{k: v for k, v in asdict(config).items() if k != "noises"}}
    if isinstance(config, CascadeConfig):
        out.pop("escalation", None)
        out["stage1"] = protocol("noop", NoopConfig(loss=config.loss), num_train_timesteps, t_star)
        out["escalation"] = protocol(config.escalate, config.escalation or STRATEGIES[config.escalate].config(
            loss=ZERO_SHOT_LOSS), num_train_timesteps)
        return out
    if isinstance(config, NoopConfig):
        out["timesteps"] = [t_star]
        out["noise"] = "learned: eps_D + g_phi(z0)"
        return out
    if isinstance(config, BaselineConfig):
        grid = evenly_spaced_timesteps(config.pairs, num_train_timesteps)
    elif isinstance(config, AdaptiveConfig):
        out["stages"] = [list(s) for s in config.stages]
        grid = evenly_spaced_timesteps(config.stages[-1][0], num_train_timesteps)
    else:
        grid = evenly_spaced_timesteps(config.max_pairs, num_train_timesteps)
        out["round_order"] = f"numpy default_rng({config.seed + 1}).permutation of the grid"
    out["timestep_grid"] = {"n": len(grid), "first": int(grid[0]), "step": int(grid[1] - grid[0]) if len(grid) > 1
                            else None, "num_train_timesteps": num_train_timesteps}
    out["noise"] = ("given bank" if getattr(config, "noises", None) is not None else
                    f"numpy default_rng({config.seed}).standard_normal float32, one per grid slot")
    return out
