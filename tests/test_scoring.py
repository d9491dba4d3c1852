"""The diffusion-classifier math, checked against formulas written here and against the reference code's arithmetic.

Torch side (`noop_rt/train/diffusion_error.py`): noising, v -> eps, error norms, the class broadcast of `ClassErrors`,
chunking. Numpy side (`noop_rt/runtime/strategies.py`): Li et al.'s grid and adaptive stages, Clark & Jaini's pruning
(p-values against scipy), the `Scores` semantics, stage parsing and the noise bank. Expected values never come from
the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ttest_rel
from torch import nn

from noop_rt.runtime import strategies
from noop_rt.runtime.errors import BadInputError
from noop_rt.train.diffusion_error import ClassErrors, NoopClassifier, class_errors, error_norm, noised, v_to_eps

ABAR = torch.linspace(0.9999, 0.005, 1000)  # any decreasing schedule will do for the stand-in UNets


# ================================================================================================ torch: formulas
def test_noised_matches_the_forward_process() -> None:
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    z_t = noised(z0, eps, torch.tensor([0.25, 0.81]))
    assert torch.allclose(z_t[0], 0.5 * z0[0] + math.sqrt(0.75) * eps[0])
    assert torch.allclose(z_t[1], 0.9 * z0[1] + math.sqrt(0.19) * eps[1])


def test_v_to_eps_recovers_the_eps_of_a_known_pair() -> None:
    """From a known (z0, eps): v = sqrt(abar) eps - sqrt(1 - abar) z0 and z_t = sqrt(abar) z0 + sqrt(1 - abar) eps
    (Salimans & Ho); then eps = sqrt(abar) v + sqrt(1 - abar) z_t must come back."""
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    abar = torch.tensor([0.9, 0.5, 0.1])
    a = abar.view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    assert torch.allclose(v_to_eps(v, z_t, abar), eps, atol=1e-5)
    assert not torch.allclose(v, eps, atol=1e-2)  # the conversion is not the identity


def test_error_norms_by_hand() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, -3.0], [0.5, 0.0]]], [[[2.0, 0.0], [0.0, -0.25]]]])
    # per row, mean over every axis after the first
    assert error_norm(pred, target, "l2").tolist() == pytest.approx([(1 + 9 + 0.25) / 4, (4 + 0.0625) / 4])
    assert error_norm(pred, target, "l1").tolist() == pytest.approx([(1 + 3 + 0.5) / 4, (2 + 0.25) / 4])
    # huber, delta 1: 0.5 d^2 where |d| < 1, |d| - 0.5 elsewhere
    assert error_norm(pred, target, "huber").tolist() == pytest.approx([(0.5 + 2.5 + 0.125) / 4,
                                                                        (1.5 + 0.03125) / 4])
    half = error_norm(pred.half(), target.half(), "l2")
    assert half.dtype == torch.float32  # reduced in float32 whatever the UNet dtype
    with pytest.raises(ValueError, match="unknown loss"):
        error_norm(pred, target, "l3")


# ================================================================================================ torch: ClassErrors
class RecordingUNet(nn.Module):
    """A stand-in UNet: out = (z_t * (1 + e) + t / 1000) where e is the embedding's first entry; records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        self.calls.append((sample.detach().clone(), timestep.detach().clone(), encoder_hidden_states.detach().clone()))
        e = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1)
        return (self.scale * (sample * (1 + e) + timestep.view(-1, 1, 1, 1) / 1000),)


def hand_norm(d: torch.Tensor, loss: str) -> float:
    a = d.abs()
    per = {"l2": a * a, "l1": a, "huber": torch.where(a < 1, 0.5 * a * a, a - 0.5)}[loss]
    return float(per.mean())


def hand_class_errors(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, loss: str,
                      v_prediction: bool = False) -> torch.Tensor:
    """Errors of the RecordingUNet written out one (row, class) at a time. emb (K, L, D) or (R, K, L, D)."""
    r, k = z0.shape[0], emb.shape[-3]
    out = torch.zeros(r, k)
    for i in range(r):
        a = ABAR[int(t[i])]
        z_t = a.sqrt() * z0[i] + (1 - a).sqrt() * eps[i]
        for j in range(k):
            e = float((emb[i, j] if emb.dim() == 4 else emb[j])[0, 0])
            pred = z_t * (1 + e) + float(t[i]) / 1000
            if v_prediction:
                pred = a.sqrt() * pred + (1 - a).sqrt() * z_t
            out[i, j] = hand_norm(pred - eps[i], loss)
    return out


def test_every_class_of_a_row_sees_the_same_z_t_t_and_target() -> None:
    unet = RecordingUNet()
    module = ClassErrors(unet, ABAR, "epsilon", ("l2", "l1", "huber"))
    z0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([120.0, 870.0])
    emb = torch.arange(5, dtype=torch.float32).mul(0.3).view(5, 1, 1).expand(5, 2, 3).contiguous()  # (K, L, D)
    errors = module(z0, eps, t, emb)
    assert len(unet.calls) == 1  # one UNet batch of R*K
    sample, timestep, hidden = unet.calls[0]
    assert sample.shape == (2 * 5, 3, 4, 4)
    for i in range(2):  # row-major: row i's classes are entries i*K .. i*K + K - 1
        a = ABAR[int(t[i])]
        z_t = a.sqrt() * z0[i] + (1 - a).sqrt() * eps[i]
        for j in range(5):
            assert torch.allclose(sample[i * 5 + j], z_t, atol=1e-6)
            assert timestep[i * 5 + j] == t[i]
            assert torch.equal(hidden[i * 5 + j], emb[j])
    assert not torch.allclose(sample[0], sample[5])  # different rows differ
    assert len(errors) == 3 and all(e.shape == (2, 5) for e in errors)
    for loss, got in zip(("l2", "l1", "huber"), errors, strict=True):
        assert torch.allclose(got, hand_class_errors(z0, eps, t, emb, loss), rtol=1e-5, atol=1e-6), loss


def test_per_row_embeddings_score_each_row_against_its_own_classes() -> None:
    unet = RecordingUNet()
    module = ClassErrors(unet, ABAR, "epsilon", ("l1",))
    z0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([10.0, 500.0, 990.0])
    emb = torch.randn(3, 4, 2, 6)  # (R, K, L, D): every row its own 4 classes
    (errors,) = module(z0, eps, t, emb)
    _, _, hidden = unet.calls[0]
    assert torch.equal(hidden, emb.reshape(12, 2, 6))
    assert torch.allclose(errors, hand_class_errors(z0, eps, t, emb, "l1"), rtol=1e-5, atol=1e-6)


def test_v_prediction_is_converted_with_the_written_out_formula() -> None:
    module = ClassErrors(RecordingUNet(), ABAR, "v_prediction", ("l2",))
    z0, eps, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4), torch.tensor([300.0, 700.0])
    emb = torch.randn(3, 1, 4)
    (errors,) = module(z0, eps, t, emb)
    assert torch.allclose(errors, hand_class_errors(z0, eps, t, emb, "l2", v_prediction=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(errors, hand_class_errors(z0, eps, t, emb, "l2"), rtol=1e-3)


@pytest.mark.parametrize("max_batch", [1, 2, 3, 4, 5, 7, 100])
def test_chunked_class_errors_equal_one_call_and_respect_the_batch_limit(max_batch: int) -> None:
    unet = RecordingUNet()
    module = ClassErrors(unet, ABAR, "epsilon", ("huber",))
    z0, eps = torch.randn(5, 2, 3, 3) * 2, torch.randn(5, 2, 3, 3)
    t = torch.tensor([5.0, 250.0, 500.0, 750.0, 995.0])
    emb = torch.randn(4, 2, 3)  # K = 4: max_batch < 4 splits the classes of a row too
    whole = module(z0, eps, t, emb)[0]
    unet.calls.clear()
    chunked = class_errors(module, z0, eps, t, emb, max_batch)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    assert sum(len(c[0]) for c in unet.calls) == 5 * 4  # every (row, class) exactly once
    assert max(len(c[0]) for c in unet.calls) <= max_batch


@pytest.mark.parametrize("max_batch", [4, 5, 9, 100])
def test_chunked_per_row_class_errors_equal_one_call(max_batch: int) -> None:
    unet = RecordingUNet()
    module = ClassErrors(unet, ABAR, "epsilon", ("l2",))
    z0, eps = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    t = torch.tensor([5.0, 250.0, 500.0, 750.0, 995.0])
    emb = torch.randn(5, 4, 2, 3)
    whole = module(z0, eps, t, emb)[0]
    unet.calls.clear()
    assert torch.allclose(class_errors(module, z0, eps, t, emb, max_batch), whole, rtol=1e-6, atol=1e-7)
    assert max(len(c[0]) for c in unet.calls) <= max_batch


def test_per_row_class_errors_keep_the_batch_limit_when_a_row_does_not_fit() -> None:
    unet = RecordingUNet()
    module = ClassErrors(unet, ABAR, "epsilon", ("l2",))
    z0, eps, t = torch.randn(3, 2, 3, 3), torch.randn(3, 2, 3, 3), torch.tensor([5.0, 500.0, 995.0])
    emb = torch.randn(3, 5, 2, 3)
    whole = module(z0, eps, t, emb)[0]
    unet.calls.clear()
    assert torch.allclose(class_errors(module, z0, eps, t, emb, 2), whole, rtol=1e-6, atol=1e-7)
    assert max(len(c[0]) for c in unet.calls) <= 2


def test_noop_classifier_is_one_pass_at_t_star_with_the_learned_noise() -> None:
    from noop_rt.train.noop import NoiseModel

    eps_d = torch.randn(3, 4, 4)
    unet = RecordingUNet()
    clf = NoopClassifier(nn.Identity(), NoiseModel(eps_d, None), ClassErrors(unet, ABAR, "epsilon", ("l1",)),
                         t_star=300, tau=2.5)
    image, emb = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(4, 2, 5)
    errors, probs = clf(image, emb)
    assert len(unet.calls) == 1 and (unet.calls[0][1] == 300).all()
    expected = hand_class_errors(image, eps_d.expand(2, -1, -1, -1), torch.tensor([300.0, 300.0]), emb, "l1")
    assert torch.allclose(errors, expected, rtol=1e-5, atol=1e-6)
    weights = torch.exp(-2.5 * expected)
    assert torch.allclose(probs, weights / weights.sum(dim=1, keepdim=True), atol=1e-6)


# ================================================================================================ torch: real UNets
def unet_by_hand(unet: nn.Module, abar: torch.Tensor, v_prediction: bool, z0: torch.Tensor, eps: torch.Tensor,
                 t: torch.Tensor, emb: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Each (row, class) as its own batch-1 UNet call; v -> eps with eps = sqrt(abar) v + sqrt(1 - abar) z_t."""
    out = torch.zeros(len(z0), len(emb))
    for i in range(len(z0)):
        a = abar[int(t[i])]
        z_t = a.sqrt() * z0[i] + (1 - a).sqrt() * eps[i]
        for j in range(len(emb)):
            raw = unet(z_t[None], t[i:i + 1], encoder_hidden_states=emb[j:j + 1]).sample[0]
            pred = a.sqrt() * raw + (1 - a).sqrt() * z_t if v_prediction else raw
            out[i, j] = hand_norm(pred - eps[i], loss)
    return out


def scheduler_alphas(folder) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod.float()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_class_errors_of_a_tiny_sd_equal_errors_computed_by_hand(prediction, tiny_sd, tiny_sd_v) -> None:
    from noop_rt.train.backbones import load_backbone

    folder = tiny_sd if prediction == "epsilon" else tiny_sd_v
    bb = load_backbone(folder)
    assert bb.prediction_type == prediction
    abar = scheduler_alphas(folder)
    emb = bb.embed(["a red square", "a blue circle", "a green square"])
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, *bb.latent_shape, generator=gen)
    eps = torch.randn(2, *bb.latent_shape, generator=gen)
    t = torch.tensor([400.0, 850.0])
    module = bb.class_errors(("l2", "l1"))
    with torch.no_grad():
        l2, l1 = module(z0, eps, t, emb)
        assert torch.allclose(l2, unet_by_hand(bb.unet, abar, prediction != "epsilon", z0, eps, t, emb), rtol=1e-4)
        assert torch.allclose(l1, unet_by_hand(bb.unet, abar, prediction != "epsilon", z0, eps, t, emb, "l1"),
                              rtol=1e-4)
        assert torch.allclose(class_errors(module, z0, eps, t, emb, max_batch=2), l2, rtol=1e-4)
        if prediction == "v_prediction":  # the raw output taken as eps would give other errors
            assert not torch.allclose(l2, unet_by_hand(bb.unet, abar, False, z0, eps, t, emb), rtol=1e-2)


def test_temperature_recovers_a_known_tau_and_stays_finite_when_separable() -> None:
    from noop_rt.train.calibration import fit_temperature

    gen = torch.Generator().manual_seed(0)
    errors = torch.rand((4000, 5), generator=gen)
    true_tau = 8.0
    labels = torch.multinomial(torch.softmax(-true_tau * errors, dim=1), 1, generator=gen)[:, 0]
    assert abs(fit_temperature(errors, labels) - true_tau) / true_tau < 0.15
    # perfectly separable: the plain NLL would push tau to infinity; the weak prior keeps it finite
    labels = errors.argmin(dim=1)
    tau = fit_temperature(errors, labels)
    assert 0 < tau < 1e3
    assert fit_temperature(errors, labels, prior_weight=0.0) > 2 * tau


# ================================================================================================ numpy: grids, noise
@pytest.mark.parametrize(("n", "total"), [(n, 1000) for n in (1, 3, 7, 10, 25, 50, 100, 250, 1000)]
                         + [(n, 50) for n in (1, 3, 7, 10, 25, 50)])
def test_evenly_spaced_timesteps_are_li_et_als_grid(n: int, total: int) -> None:
    ts = strategies.evenly_spaced_timesteps(n, total)
    assert ts.dtype == np.int64
    assert ts.tolist() == list(range(total // n // 2, total, total // n))[:n]  # their eval_prob_adaptive.py
    assert len(ts) == n


def test_published_grid_values() -> None:
    assert strategies.evenly_spaced_timesteps(1).tolist() == [500]
    assert strategies.evenly_spaced_timesteps(4).tolist() == [125, 375, 625, 875]
    assert strategies.evenly_spaced_timesteps(250)[:3].tolist() == [2, 6, 10]


def test_noise_bank_is_reproducible_by_seed() -> None:
    a = strategies.noise_bank(6, (2, 3, 3), seed=7)
    assert a.shape == (6, 2, 3, 3) and a.dtype == np.float32
    assert np.array_equal(a, strategies.noise_bank(6, (2, 3, 3), seed=7))
    assert not np.allclose(a, strategies.noise_bank(6, (2, 3, 3), seed=8))
    big = strategies.noise_bank(4000, (2, 3, 3), seed=0)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02  # standard normal


def test_parse_stages() -> None:
    assert strategies.parse_stages("25:5,250:1") == ((25, 5), (250, 1))
    assert strategies.parse_stages(" 20:20, 50:10 ,100:5,500:1 ") == ((20, 20), (50, 10), (100, 5), (500, 1))
    assert strategies.parse_stages("pets") == ((25, 5), (250, 1))  # Li et al.'s commands.md
    assert strategies.parse_stages(" Food ") == ((20, 20), (50, 10), (100, 5), (500, 1))
    assert strategies.parse_stages("imagenet") == ((50, 500), (100, 50), (500, 10), (1000, 1))
    for bad in ("25", "25:5,", "a:1", "25:x", "25:5:1", "250:5,25:1", "0:1", "25:0", "", "-5:1", "pet"):
        with pytest.raises(ValueError, match="stage"):
            strategies.parse_stages(bad)


def test_make_config_takes_its_own_options_and_ignores_none() -> None:
    cfg = strategies.make_config("adaptive", stages=((5, 2), (10, 1)), pairs=99, alpha=0.5, loss=None, seed=3)
    assert cfg == strategies.AdaptiveConfig(stages=((5, 2), (10, 1)), seed=3)
    assert strategies.make_config("pruned", max_pairs=20, round_size=4) == strategies.PrunedConfig(max_pairs=20,
                                                                                             round_size=4)
    assert set(strategies.STRATEGIES) == set(strategies.METHODS)


# ================================================================================================ numpy: strategies
SHAPE = (2, 3, 3)


def oracle_error(margin: np.ndarray, cls: np.ndarray, t: np.ndarray, eps: np.ndarray, jitter: float) -> np.ndarray:
    """The oracle's error of class `cls` at (t, eps): its margin, a small class- and t-dependent wobble, and a term
    shared by every class of the pair. Broadcasts (R, 1) pair columns against (1, K) class rows."""
    shared = 0.3 * np.abs(eps).reshape(len(eps), -1).mean(axis=1, keepdims=True)
    return margin + jitter * np.sin(t[:, None] * (cls[None, :] + 1) / 100.0) + shared


class Oracle:
    """A ScoringModel that knows which image a z0 row comes from (image i is the constant array i) and returns errors
    with per-image class margins; records every class_errors call."""

    num_train_timesteps = 1000
    latent_shape = SHAPE

    def __init__(self, margins: np.ndarray, jitter: float = 0.05) -> None:
        self.margins = np.asarray(margins, dtype=np.float64)  # (B, C), 0 for each image's true class
        self.num_classes = self.margins.shape[1]
        self.jitter = jitter
        self.calls: list[dict] = []

    def images(self) -> np.ndarray:
        return np.stack([np.full(SHAPE, float(i), np.float32) for i in range(len(self.margins))])

    def encode(self, images: np.ndarray) -> np.ndarray:
        return images.copy()

    def noop_errors(self, images: np.ndarray, loss: str) -> np.ndarray:
        self.calls.append({"noop": True, "loss": loss, "n": len(images)})
        return self.margins[images[:, 0, 0, 0].astype(int)].astype(np.float32)

    def class_errors(self, z0, eps, t, classes, loss, progress=None) -> np.ndarray:
        cls = np.arange(self.num_classes) if classes is None else np.asarray(classes)
        img = z0[:, 0, 0, 0].astype(int)
        self.calls.append({"img": img.copy(), "eps": eps.copy(), "t": np.asarray(t).copy(), "classes": cls.copy(),
                           "loss": loss})
        if progress is not None:
            progress(len(z0) * len(cls))
        return self.error(img, cls, np.asarray(t), eps).astype(np.float32)

    def error(self, img: np.ndarray, cls: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        return oracle_error(self.margins[img][:, cls], cls, t.astype(np.float64), eps, self.jitter)


def margins_with_best(best: list[int], num_classes: int) -> np.ndarray:
    out = np.stack([np.linspace(0.4, 1.5, num_classes) for _ in best])
    for i, b in enumerate(best):
        out[i, b] = 0.0
    return out


def li_schedule(stages: tuple[tuple[int, int], ...], total: int) -> list[tuple[list[int], list[int]]]:
    """Li et al.'s eval_prob_adaptive, its timestep and noise bookkeeping only (their variable names, n_trials 1):
    per stage, the timesteps it adds and the noise index of each."""
    max_n_samples = max(n for n, _ in stages)
    start = total // max_n_samples // 2
    t_to_eval = list(range(start, total, total // max_n_samples))[:max_n_samples]
    t_evaluated: set[int] = set()
    out = []
    for n_samples, _ in stages:
        curr_t_to_eval = t_to_eval[len(t_to_eval) // n_samples // 2::len(t_to_eval) // n_samples][:n_samples]
        curr_t_to_eval = [t for t in curr_t_to_eval if t not in t_evaluated]
        noise_idxs = [t_idx for t_idx, _ in enumerate(curr_t_to_eval, start=len(t_evaluated))]
        t_evaluated.update(curr_t_to_eval)
        out.append((curr_t_to_eval, noise_idxs))
    return out


def test_baseline_scores_every_class_on_the_same_pairs() -> None:
    model = Oracle(margins_with_best([2, 0], 4))
    bank = np.random.default_rng(5).standard_normal((6, *SHAPE)).astype(np.float32)
    ticks: list[int] = []
    scores = strategies.baseline(model, model.images(), strategies.BaselineConfig(pairs=6, loss="l1", noises=bank),
                              ticks.append)
    grid = np.array(list(range(1000 // 6 // 2, 1000, 1000 // 6))[:6])  # 83, 249, ..., 913
    rows = {k: np.concatenate([c[k] for c in model.calls]) for k in ("img", "t", "eps")}
    assert all(c["classes"].tolist() == [0, 1, 2, 3] and c["loss"] == "l1" for c in model.calls)
    for i in range(2):
        mine = rows["img"] == i
        assert rows["t"][mine].tolist() == grid.tolist()
        assert np.array_equal(rows["eps"][mine], bank)
        expected = model.error(np.full(6, i), np.arange(4), grid, bank).mean(axis=0)
        assert np.allclose(scores.errors[i], expected, rtol=1e-6)
    assert scores.predictions().tolist() == [2, 0]
    assert scores.unet_evals.tolist() == [6 * 4, 6 * 4] and sum(ticks) == 2 * 6 * 4
    assert (scores.pairs_scored == 6).all() and scores.survivors.all()


def test_baseline_seeded_bank_and_a_bad_bank() -> None:
    model = Oracle(margins_with_best([1], 3))
    strategies.baseline(model, model.images(), strategies.BaselineConfig(pairs=4, seed=11, loss="l2"))
    assert np.array_equal(np.concatenate([c["eps"] for c in model.calls]), strategies.noise_bank(4, SHAPE, 11))
    with pytest.raises(BadInputError, match="noise bank"):  # one line to a user, not an internal error
        strategies.baseline(model, model.images(), strategies.BaselineConfig(pairs=4, loss="l2",
                                                                        noises=np.zeros((3, *SHAPE))))
    with pytest.raises(ValueError, match="unknown loss"):
        strategies.baseline(model, model.images(), strategies.BaselineConfig(pairs=4))  # no loss chosen


# Li et al.'s grid for 50 pairs is t = 10, 30, ..., 990 (slots 0..49). Stage (5, keep 3) takes every 10th slot from
# slot 5: t = 110, 310, 510, 710, 910 -- all five are in the 50-grid, so stage (50, keep 1) adds the other 45.
# UNet evaluations: 5 pairs x 8 classes + 45 pairs x 3 survivors = 40 + 135 = 175.
#
# Three stages over the 10-grid t = 50, 150, ..., 950: (2, keep 4) takes slots 2, 7 (stride 5 from 2); (5, keep 2)
# takes slots 1, 3, 5, 7, 9 of which 7 is done: 4 new; (10, keep 1) takes all 10 of which 6 are done: 4 new.
# UNet evaluations: 2 x 8 + 4 x 4 + 4 x 2 = 16 + 16 + 8 = 40.
@pytest.mark.parametrize(("stages", "evals", "stage_ts"), [
    (((5, 3), (50, 1)), 5 * 8 + 45 * 3, [[110, 310, 510, 710, 910], None]),
    (((2, 4), (5, 2), (10, 1)), 2 * 8 + 4 * 4 + 4 * 2, [[250, 750], [150, 350, 550, 950], [50, 450, 650, 850]]),
])
def test_adaptive_follows_li_et_als_schedule_and_noise_indexing(stages, evals, stage_ts) -> None:
    model = Oracle(margins_with_best([5], 8))
    n = stages[-1][0]
    bank = np.random.default_rng(9).standard_normal((n, *SHAPE)).astype(np.float32)
    config = strategies.AdaptiveConfig(stages=stages, loss="l2", noises=bank)
    scores = strategies.adaptive(model, model.images(), config)
    assert scores.unet_evals.tolist() == [evals]
    assert sum(len(c["img"]) * len(c["classes"]) for c in model.calls) == evals
    assert scores.predictions().tolist() == [5]
    reference = li_schedule(stages, 1000)
    assert len(model.calls) == len(stages)
    alive = np.arange(8)
    seen_t: list[np.ndarray] = []
    seen_eps: list[np.ndarray] = []
    for call, (ts, noise_idxs), (_, keep), written in zip(model.calls, reference, stages, stage_ts, strict=True):
        if written is not None:
            assert ts == written
        assert call["t"].tolist() == ts
        assert np.array_equal(call["eps"], bank[noise_idxs])  # the k-th timestep evaluated takes noise k
        assert sorted(call["classes"].tolist()) == sorted(alive.tolist())
        seen_t.append(call["t"])
        seen_eps.append(call["eps"])
        t_all, eps_all = np.concatenate(seen_t), np.concatenate(seen_eps)
        mean = model.error(np.zeros(len(t_all), int), np.arange(8), t_all, eps_all).mean(axis=0)
        alive = np.array(sorted(alive, key=lambda c: mean[c])[:keep])  # the `keep` lowest mean errors
    assert np.concatenate(seen_eps).shape[0] == n and np.array_equal(np.concatenate(seen_eps), bank)
    finalists = scores.survivors[0]
    assert sorted(np.flatnonzero(finalists).tolist()) == sorted(model.calls[-1]["classes"].tolist())
    assert (scores.pairs_scored[0, finalists] == n).all() and (scores.pairs_scored[0, ~finalists] < n).all()


def test_adaptive_picks_each_images_class_and_uses_the_seeded_bank() -> None:
    model = Oracle(margins_with_best([5, 1], 8))
    scores = strategies.adaptive(model, model.images(), strategies.AdaptiveConfig(stages=((5, 3), (50, 1)), seed=4,
                                                                            loss="huber"))
    assert scores.predictions().tolist() == [5, 1]
    bank = strategies.noise_bank(50, SHAPE, 4)
    for i in range(2):
        eps = np.concatenate([c["eps"] for c in model.calls if c["img"][0] == i])
        assert np.array_equal(eps, bank)
    probs = scores.probabilities(10.0)
    assert np.allclose(probs.sum(axis=1), 1) and (probs[~scores.survivors] == 0).all()


def test_pruned_picks_the_class_for_fewer_evaluations_than_baseline() -> None:
    model = Oracle(margins_with_best([5], 8))
    base = strategies.baseline(Oracle(model.margins), model.images(), strategies.BaselineConfig(pairs=50, loss="l2"))
    pruned = strategies.pruned(model, model.images(), strategies.PrunedConfig(max_pairs=50, round_size=5, loss="l2"))
    assert base.predictions().tolist() == pruned.predictions().tolist() == [5]
    assert base.unet_evals.tolist() == [50 * 8]
    assert pruned.unet_evals[0] < base.unet_evals[0]
    assert pruned.unet_evals[0] == sum(len(c["img"]) * len(c["classes"]) for c in model.calls)
    assert pruned.survivors.sum() == 1 and pruned.survivors[0, 5]
    probs = pruned.probabilities(10.0)
    assert probs[0, 5] == pytest.approx(1.0) and probs.sum() == pytest.approx(1.0)
    assert pruned.ranking()[0, 0] == 5


def test_pruned_drops_exactly_the_classes_scipys_paired_t_test_rejects() -> None:
    margins = np.array([[0.0, 0.02, 0.05, 0.1, 0.15, 0.3, 0.6, 1.0]])  # some classes survive a few rounds
    model = Oracle(margins, jitter=0.2)
    alpha = 0.05
    scores = strategies.pruned(model, model.images(), strategies.PrunedConfig(max_pairs=60, round_size=4, alpha=alpha,
                                                                        loss="l2"))
    grid = list(range(1000 // 60 // 2, 1000, 1000 // 60))[:60]
    per_pair = {c: [] for c in range(8)}
    alive = list(range(8))
    used_t: list[int] = []
    for call in model.calls:
        assert sorted(call["classes"].tolist()) == alive  # the survivors of the previous round, nothing else
        errs = model.error(np.zeros(len(call["t"]), int), call["classes"], call["t"], call["eps"])
        for j, c in enumerate(call["classes"]):
            per_pair[c] += errs[:, j].tolist()
        used_t += call["t"].tolist()
        table = np.array([per_pair[c][-len(used_t):] for c in alive]).T  # (pairs so far, alive)
        best = int(table.mean(axis=0).argmin())
        alive = [c for k, c in enumerate(alive) if k == best or ttest_rel(
            table[:, k], table[:, best], alternative="greater").pvalue >= alpha]
    counts = [len(c["classes"]) for c in model.calls]
    assert len(counts) >= 3 and 1 < counts[1] < 8  # the case under test: several rounds, a partial elimination
    assert sorted(np.flatnonzero(scores.survivors[0]).tolist()) == alive
    assert len(set(used_t)) == len(used_t) and set(used_t) <= set(grid)  # distinct timesteps of the grid
    means = {c: float(np.mean(per_pair[c])) for c in range(8)}
    assert scores.errors[0].tolist() == pytest.approx([means[c] for c in range(8)])  # each over its own pairs
    assert scores.pairs_scored[0].tolist() == [len(per_pair[c]) for c in range(8)]
    assert scores.predictions().tolist() == [min(alive, key=means.get)]


def test_pruned_keeps_indistinguishable_classes_until_the_budget() -> None:
    model = Oracle(np.zeros((1, 3)), jitter=0.0)  # every class identical: no test can reject, all pairs get spent
    scores = strategies.pruned(model, model.images(), strategies.PrunedConfig(max_pairs=20, round_size=5, loss="l2"))
    assert scores.unet_evals.tolist() == [20 * 3]
    assert scores.survivors.all()
    assert sorted(np.concatenate([c["t"] for c in model.calls]).tolist()) == \
        list(range(1000 // 20 // 2, 1000, 1000 // 20))[:20]


def test_paired_t_pvalues_match_scipy() -> None:
    rng = np.random.default_rng(0)
    for n, k in ((2, 3), (5, 4), (12, 6), (40, 9)):
        per_pair = rng.normal(size=(n, 1)) + rng.normal(0.3, 0.5, size=(n, k))
        per_pair[:, 1] -= 0.5  # a clear best
        best = int(per_pair.mean(axis=0).argmin())
        p = strategies.paired_t_pvalues(per_pair, best)
        for c in range(k):
            if c != best:
                assert p[c] == pytest.approx(ttest_rel(per_pair[:, c], per_pair[:, best],
                                                       alternative="greater").pvalue, rel=1e-9, abs=1e-15)
        assert p[best] == 1.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_paired_t_pvalue_of_a_constant_worse_class_matches_scipy() -> None:
    best = np.array([1.0, 2.0, 3.0, 4.0])
    per_pair = np.stack([best, best + 0.5], axis=1)
    expected = ttest_rel(per_pair[:, 1], per_pair[:, 0], alternative="greater").pvalue
    assert strategies.paired_t_pvalues(per_pair, 0)[1] == pytest.approx(expected)


def test_noop_strategy_spends_c_evaluations_per_image() -> None:
    model = Oracle(margins_with_best([3, 0, 2], 5))
    ticks: list[int] = []
    scores = strategies.noop(model, model.images(), strategies.NoopConfig(loss="l1"), ticks.append)
    assert model.calls == [{"noop": True, "loss": "l1", "n": 3}]
    assert scores.unet_evals.tolist() == [5, 5, 5] and sum(ticks) == 15
    assert scores.predictions().tolist() == [3, 0, 2]
    assert (scores.pairs_scored == 1).all() and scores.alive is None


# ================================================================================================ numpy: Scores
def test_scores_semantics_with_eliminated_classes() -> None:
    scores = strategies.Scores(
        errors=np.array([[0.5, 0.1, 0.3, 0.2], [0.1, 0.3, 0.2, 0.4]]),
        pairs_scored=np.array([[10, 2, 10, 10], [2, 10, 10, 10]]),
        unet_evals=np.array([32, 32]),
        alive=np.array([[True, False, True, True], [True, True, True, True]]),
    )
    # row 0: class 1 has the lowest error but was eliminated; the prediction is the best survivor
    assert scores.predictions().tolist() == [3, 0]
    probs = scores.probabilities(2.0)
    assert probs[0, 1] == 0.0
    w = [math.exp(-2 * e) for e in (0.5, 0.3, 0.2)]
    assert probs[0, [0, 2, 3]].tolist() == pytest.approx([x / sum(w) for x in w])
    w = [math.exp(-2 * e) for e in (0.1, 0.3, 0.2, 0.4)]
    assert probs[1].tolist() == pytest.approx([x / sum(w) for x in w])
    # a per-image tau (B, 1)
    per_image = scores.probabilities(np.array([[2.0], [0.0]]))
    assert per_image[1].tolist() == pytest.approx([0.25] * 4) and per_image[0, 1] == 0.0
    # ranking: survivors first, then more pairs scored, then lower error
    assert scores.ranking().tolist() == [[3, 2, 0, 1], [2, 1, 3, 0]]
    assert scores.survivors.tolist() == scores.alive.tolist()
    # a class eliminated on as many pairs as the survivors (the last round of `pruned`) still ranks after them
    last_round = strategies.Scores(np.array([[0.1, 0.2, 0.3]]), np.full((1, 3), 10), np.array([30]),
                                alive=np.array([[True, False, True]]))
    assert last_round.ranking().tolist() == [[0, 2, 1]]


def test_scores_without_eliminations_and_concat() -> None:
    a = strategies.Scores(np.array([[0.3, 0.1]]), np.ones((1, 2), np.int64), np.array([2]))
    assert a.survivors.all() and a.predictions().tolist() == [1] and a.ranking().tolist() == [[1, 0]]
    b = strategies.Scores(np.array([[0.1, 0.3]]), np.ones((1, 2), np.int64), np.array([2]),
                       alive=np.array([[False, True]]))
    both = strategies.Scores.concat([a, b])
    assert both.predictions().tolist() == [1, 1]
    assert both.survivors.tolist() == [[True, True], [False, True]]
    assert strategies.Scores.concat([a, a]).alive is None
