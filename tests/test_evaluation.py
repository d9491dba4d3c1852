"""Benchmark helpers (noop_rt/jobs/accuracy.py) on the demo model: labels follow class names whatever the classifier's
column order, ONE random noise agrees with the baseline strategy's single pair, and the protocol records what was
asked for."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from noop_rt.demo import DIGIT_NAMES
from noop_rt.demo.digits import split_tensors
from noop_rt.jobs.accuracy import (
    accuracy,
    demo_backbone,
    demo_test_set,
    mean_std,
    model_protocol,
    noop_classifier,
    protocol_lines,
    same_record,
    score_set,
    single_noise,
    single_noise_protocol,
    strategy_protocol,
    targets,
)
from noop_rt.runtime import strategies
from noop_rt.runtime.errors import BadInputError


@pytest.fixture(scope="module")
def backbone():
    clf = demo_backbone()
    yield clf
    clf.close()


@pytest.fixture(scope="module")
def noop():
    clf = noop_classifier()
    yield clf
    clf.close()


def test_demo_test_set_is_the_held_out_split_with_digit_names() -> None:
    data = demo_test_set(12)
    x, y = split_tensors("test")
    assert data.images.shape == (12, 3, 16, 16) and data.images.dtype == np.float32
    np.testing.assert_array_equal(data.images, x[:12].numpy())
    assert data.names == [DIGIT_NAMES[int(k)] for k in y[:12]]
    assert data.record() == {"set": data.description, "images": 12}
    assert len(demo_test_set()) == len(y)


def test_targets_follow_names_not_column_order(noop) -> None:
    # The checkpoint's classes are in image-folder (alphabetical) order, not digit order.
    assert noop.classes != list(DIGIT_NAMES)
    t = targets(noop, ["zero", "nine", "eight"])
    assert [noop.classes[i] for i in t] == ["zero", "nine", "eight"]
    with pytest.raises(BadInputError, match="ten"):
        targets(noop, ["ten"])


def test_noop_accuracy_through_the_name_mapping_is_high(noop) -> None:
    # A digit value used as a column index would score near chance in the alphabetical order.
    data = demo_test_set(30)
    scores = score_set(noop, data.images, "noop", chunk=16)
    assert accuracy(scores, targets(noop, data.names)) >= 0.9
    assert (scores.unet_evals == len(noop.classes)).all()


def test_single_noise_equals_the_baseline_strategy_with_one_pair(backbone) -> None:
    # baseline with 1 pair: t = 500 (Li et al.'s grid) and noise_bank(1, ..., seed): the same pair by another path.
    data = demo_test_set(6)
    z0 = backbone.model.encode(data.images)
    for seed in (0, 3):
        single = single_noise(backbone, z0, 500, seed, "l1")
        base = score_set(backbone, data.images, "baseline", chunk=4, pairs=1, seed=seed, loss="l1")
        np.testing.assert_allclose(single.errors, base.errors, rtol=1e-5, atol=1e-7)
    other = single_noise(backbone, z0, 500, 1, "l1")
    assert not np.allclose(other.errors, single.errors)  # another seed is another noise


def test_single_noise_shares_eps_across_images(backbone) -> None:
    # Two copies of one image get identical errors only if every row sees the same eps.
    data = demo_test_set(1)
    z0 = backbone.model.encode(np.concatenate([data.images, data.images]))
    s = single_noise(backbone, z0, 300, 2, "l2")
    np.testing.assert_array_equal(s.errors[0], s.errors[1])
    assert s.errors.shape == (2, len(backbone.classes))


def test_protocol_records_model_and_requested_strategy(backbone, noop) -> None:
    m = model_protocol(backbone, 17)
    assert m["images"] == 17 and m["classes"] == list(DIGIT_NAMES)
    assert m["model"]["fingerprint"] and m["model"]["source"] == "diffusers"
    assert "strategy" not in m and m["prompts"][3] == "a handwritten digit three"
    s = strategy_protocol(backbone, "baseline", pairs=7, seed=4, loss="huber")
    assert (s["method"], s["pairs"], s["seed"], s["loss"]) == ("baseline", 7, 4, "huber")
    assert s["timestep_grid"]["n"] == 7
    n = strategy_protocol(noop, "noop")
    assert n["timesteps"] == [noop.model.info.t_star] and n["loss"] == noop.model.info.loss
    single = single_noise_protocol(backbone, 300, range(3), "l2")
    assert single["seeds"] == [0, 1, 2] and single["t"] == 300
    record = {"models": {"backbone": m}, "runs": {"b": s, "single": single}}
    lines = protocol_lines(record)
    assert "## Protocol" in lines
    block = "\n".join(lines[lines.index("```json") + 1:lines.index("```", lines.index("```json"))])
    assert json.loads(block) == json.loads(json.dumps(record))


def test_same_record_compares_through_json() -> None:
    assert same_record({"stages": ((2, 5), (20, 1))}, {"stages": [[2, 5], [20, 1]]})
    assert not same_record({"pairs": 10}, {"pairs": 11})
    assert not same_record(None, {"pairs": 10})


def test_mean_std_is_the_sample_std() -> None:
    values = [0.5, 0.9, 0.75, 0.6]
    m, s = mean_std(values)
    assert m == pytest.approx(statistics.mean(values)) and s == pytest.approx(statistics.stdev(values))
    assert mean_std([0.3]) == (0.3, 0.0)


def test_accuracy_counts_argmin_hits() -> None:
    errors = np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.4]])
    s = strategies.Scores(errors, np.ones((3, 2), np.int64), np.full(3, 2, np.int64))
    assert accuracy(s, np.array([0, 1, 1])) == pytest.approx(2 / 3)
