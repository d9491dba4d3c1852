"""The diffusion-classifier math: formulas, shared noise, batching/chunking invariance, strategies."""

from __future__ import annotations

import math

import pytest
import torch

from noop_rt import scoring
from noop_rt.backbone import load_backbone, v_to_eps

ABAR = torch.linspace(0.9999, 0.005, 1000)


def test_noised_matches_formula() -> None:
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    abar = torch.tensor([0.25, 0.81])
    z_t = scoring.noised(z0, eps, abar)
    assert torch.allclose(z_t[0], 0.5 * z0[0] + math.sqrt(0.75) * eps[0])
    assert torch.allclose(z_t[1], 0.9 * z0[1] + math.sqrt(0.19) * eps[1])


def test_error_norms() -> None:
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -3.0], [0.5, 0.0]]]])
    assert scoring.error_norm(pred, target, "l2").item() == pytest.approx((1 + 9 + 0.25) / 4)
    assert scoring.error_norm(pred, target, "l1").item() == pytest.approx((1 + 3 + 0.5) / 4)
    assert scoring.error_norm(pred, target, "huber").item() == pytest.approx((0.5 + 2.5 + 0.125) / 4)
    with pytest.raises(ValueError, match="unknown loss"):
        scoring.error_norm(pred, target, "l3")


def test_evenly_spaced_timesteps_follow_li() -> None:
    assert scoring.evenly_spaced_timesteps(1).tolist() == [500]
    ts = scoring.evenly_spaced_timesteps(100)
    assert ts[0] == 5 and ts[-1] == 995 and len(ts) == 100 and (ts.diff() == 10).all()
    assert len(scoring.evenly_spaced_timesteps(250)) == 250


class Recorder:
    """An eps-model that records what it was called with: output depends on the class embedding and the input."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        self.calls.append((z_t.clone(), t.clone(), emb.clone()))
        return z_t * emb[:, 0, 0].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_every_class_sees_the_same_noise_and_timestep() -> None:
    rec = Recorder()
    z0 = torch.randn(2, 3, 4, 4)
    emb = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 2, 3).contiguous()
    scoring.baseline_scores(rec, z0, emb, ABAR, n=3, max_batch=4)
    z_t = torch.cat([c[0] for c in rec.calls])
    t = torch.cat([c[1] for c in rec.calls])
    e = torch.cat([c[2] for c in rec.calls])
    assert len(z_t) == 2 * 3 * 5
    groups = z_t.view(2 * 3, 5, -1)  # image-major, then pair, then class
    assert torch.equal(groups, groups[:, :1].expand_as(groups))  # same z_t for all classes of a pair
    assert torch.equal(t.view(6, 5), t.view(6, 5)[:, :1].expand(6, 5))
    assert torch.equal(e[:, 0, 0].view(6, 5), torch.arange(5.0).expand(6, 5))  # each class its own embedding
    assert not torch.equal(groups[0, 0], groups[1, 0])  # different pairs differ


@pytest.fixture(scope="module")
def tiny_backbone(tiny_sd):
    return load_backbone(tiny_sd)


def test_batched_equals_per_class_and_chunking_invariant(tiny_backbone) -> None:
    bb = tiny_backbone
    emb = bb.embed(["a red square", "a blue circle", "a green square"])
    z0 = bb.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    t = torch.tensor([[100, 700], [300, 500]])
    eps = torch.randn(2, 2, *bb.latent_shape)
    with torch.no_grad():
        full = scoring.pair_errors(bb.predict_eps, z0, t, eps, emb, bb.alphas_cumprod, max_batch=1000)
        for chunk in (1, 5, 7):
            chunked = scoring.pair_errors(bb.predict_eps, z0, t, eps, emb, bb.alphas_cumprod, max_batch=chunk)
            assert torch.allclose(full, chunked, atol=1e-5)
        for c in range(3):
            one = scoring.pair_errors(bb.predict_eps, z0, t, eps, emb[c:c + 1], bb.alphas_cumprod)
            assert torch.allclose(full[..., c:c + 1], one, atol=1e-5)
        # and by hand for one entry: err = mean((eps - unet(z_t, t, E_c))^2)
        abar = bb.alphas_cumprod[300]
        z_t = abar.sqrt() * z0[1] + (1 - abar).sqrt() * eps[1, 0]
        pred = bb.unet(z_t[None], torch.tensor([300.0]), encoder_hidden_states=emb[2:3]).sample
        assert full[1, 0, 2].item() == pytest.approx((pred - eps[1, 0]).square().mean().item(), rel=1e-4)
    assert full.shape == (2, 2, 3)


def test_v_prediction_converts_to_eps(tiny_sd_v) -> None:
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    abar = torch.tensor([0.9, 0.5, 0.1])
    a = abar.view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    z_t = scoring.noised(z0, eps, abar)
    assert torch.allclose(v_to_eps(v, z_t, abar), eps, atol=1e-5)
    bb = load_backbone(tiny_sd_v)
    assert bb.prediction_type == "v_prediction"
    emb = bb.embed(["a red square"])
    z = torch.randn(1, *bb.latent_shape)
    t = torch.tensor([400.0])
    with torch.no_grad():
        raw = bb.unet(z, t, encoder_hidden_states=emb).sample
        out = bb.predict_eps(z, t, emb)
    assert torch.allclose(out, v_to_eps(raw, z, bb.alphas_cumprod[400:401]), atol=1e-6)
    assert not torch.allclose(out, raw)


def oracle(z0: torch.Tensor, best: int, margins: torch.Tensor):
    """eps-model that knows z0: class c predicts eps + margin_c * (fixed pattern) + small t-dependent jitter."""
    pattern = torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(3))

    def eps_fn(z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        a = ABAR[t.long()].view(-1, 1, 1, 1)
        eps = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
        c = emb[:, 0, 0].long()
        jitter = torch.sin(t.view(-1, 1, 1, 1) * (c.view(-1, 1, 1, 1) + 1)) * 0.05
        return eps + (margins[c].view(-1, 1, 1, 1) + jitter) * pattern

    return eps_fn


def test_adaptive_and_pruned_agree_with_baseline_for_fewer_evals() -> None:
    num_classes, best = 8, 5
    margins = torch.linspace(0.4, 1.5, num_classes)
    margins[best] = 0.0
    z0 = torch.randn(1, 2, 4, 4)
    emb = torch.arange(num_classes, dtype=torch.float32).view(-1, 1, 1).expand(-1, 1, 2).contiguous()
    fn = oracle(z0, best, margins)
    base = scoring.baseline_scores(fn, z0, emb, ABAR, n=50)
    adaptive = scoring.adaptive_scores(fn, z0, emb, ABAR, stages=[(5, 3), (50, 1)])
    pruned = scoring.pruned_scores(fn, z0, emb, ABAR, max_pairs=50, round_size=5, alpha=0.01)
    assert base.predictions().item() == adaptive.predictions().item() == pruned.predictions().item() == best
    assert base.unet_evals.item() == 50 * num_classes
    assert adaptive.unet_evals.item() == 5 * num_classes + 45 * 3
    assert pruned.unet_evals.item() < base.unet_evals.item()
    assert adaptive.survivors.sum().item() == 3  # the finalists, all scored on the 50 pairs
    assert pruned.survivors.sum().item() == 1
    probs = pruned.probabilities(10.0)
    assert probs[0, best].item() == pytest.approx(1.0) and probs.sum().item() == pytest.approx(1.0)
    assert pruned.ranking()[0, 0].item() == best


def test_pruned_keeps_indistinguishable_classes_until_the_budget() -> None:
    margins = torch.zeros(3)  # every class identical: no test can reject, all pairs get spent
    z0 = torch.randn(1, 2, 4, 4)
    emb = torch.zeros(3, 1, 2)  # same embedding -> same predictions
    scores = scoring.pruned_scores(oracle(z0, 0, margins), z0, emb, ABAR, max_pairs=20, round_size=5)
    assert scores.unet_evals.item() == 20 * 3
    assert scores.survivors.all()


def test_noop_spends_exactly_c_evals_and_probabilities_normalise() -> None:
    rec = Recorder()
    z0, eps = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    emb = torch.randn(6, 2, 3)
    scores = scoring.noop_scores(rec, z0, eps, 500, emb, ABAR, max_batch=10)
    assert scores.unet_evals.tolist() == [6] * 4
    assert sum(len(c[0]) for c in rec.calls) == 24
    assert all((c[1] == 500).all() for c in rec.calls)
    p = scores.probabilities(3.0)
    assert torch.allclose(p.sum(dim=1), torch.ones(4))
    assert torch.equal(p.argmax(dim=1), scores.predictions())


def test_temperature_recovers_a_known_tau_and_stays_finite_when_separable() -> None:
    from noop_rt.calibration import fit_temperature

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
