"""`--method cascade`: NoOp first, a zero-shot strategy on a shortlist only where NoOp is unsure or the image is
unfamiliar. On the shipped demo bundle (onnxruntime) and on the tiny SD checkpoint; shortlists and expectations are
computed here from NoOp's errors, never taken from the code under test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import noop_rt
from noop_rt.cli import app
from noop_rt.demo import BUNDLE_DIR, EXAMPLES_DIR
from noop_rt.runtime import strategies
from noop_rt.runtime.errors import BadInputError, UsageError
from noop_rt.runtime.graph_model import GraphModel


@pytest.fixture(scope="module")
def demo() -> noop_rt.Classifier:
    return noop_rt.load(BUNDLE_DIR, backend="onnxruntime", method="cascade")


@pytest.fixture(scope="module")
def examples(demo) -> tuple[np.ndarray, list[str]]:
    from noop_rt.runtime.images import load_image

    paths = sorted(EXAMPLES_DIR.glob("*.png"))
    return np.stack([load_image(p, demo.resolution) for p in paths]), [p.stem for p in paths]


class Recording:
    """The real model, with every class_errors call's class indices written down."""

    def __init__(self, model: GraphModel) -> None:
        self.model, self.calls = model, []

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def class_errors(self, z0, eps, t, classes, loss, progress=None):
        self.calls.append(None if classes is None else np.asarray(classes).tolist())
        return self.model.class_errors(z0, eps, t, classes, loss, progress)


def stage1_probs(clf, images) -> np.ndarray:
    """NoOp's own probabilities: softmax(-tau * errors), written out here."""
    errors = clf.model.noop_errors(images, clf.model.info.loss).astype(np.float64)
    logits = -clf.model.info.tau * errors
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_a_sure_familiar_image_costs_exactly_c_evaluations(demo, examples) -> None:
    images, names = examples
    probs = stage1_probs(demo, images)
    sure = int(np.argmax(probs.max(axis=1)))
    assert probs[sure].max() > 0.99
    result = demo.classify(images[sure][None], cascade_threshold=0.9)[0]
    assert result.escalated is False
    assert result.unet_evals == len(demo.classes) == 10
    assert result.label == names[sure]
    assert result.to_json()["escalated"] is False and result.to_json()["unet_evals"] == 10


def test_an_escalated_image_scores_only_its_shortlist(demo, examples) -> None:
    images, _ = examples
    probs = stage1_probs(demo, images[:1])[0]
    threshold = 0.999999  # above this image's top-1 probability: it escalates on its confidence set
    assert probs.max() < threshold
    order = np.argsort(-probs)
    expected = set(order[:int(np.flatnonzero(np.cumsum(probs[order]) >= threshold)[0]) + 1][:4].tolist())
    expected |= set(order[:2].tolist())  # never fewer than 2
    recording = Recording(demo.model)
    demo.model = recording
    try:
        result = demo.classify(images[:1], cascade_threshold=threshold, shortlist=4)[0]
    finally:
        demo.model = recording.model
    assert result.escalated is True
    scored = set().union(*[set(c) for c in recording.calls])
    assert recording.calls and None not in recording.calls
    assert scored <= expected, f"scored classes {scored} outside the shortlist {expected}"
    assert result.label in {demo.classes[c] for c in expected}
    assert result.unet_evals > 10


def test_the_escalation_equals_the_strategy_on_the_shortlisted_classes(demo, examples) -> None:
    """Same noises, same pairs: pruned on a model holding only the shortlisted classes' embeddings gives the errors
    the cascade reports for those classes."""
    images, _ = examples
    image = images[3][None]
    probs = stage1_probs(demo, image)[0]
    shortlist = np.argsort(-probs)[:3]
    scores, _ = demo.score(image, "cascade", cascade_threshold=1.0, shortlist=3, escalate="pruned")
    assert bool(scores.escalated[0])
    sub = demo.model.with_classes(demo.model.emb[shortlist], trained=False)
    direct = strategies.pruned(sub, image, demo.config("pruned", loss="l2"))  # the escalation's zero-shot error
    np.testing.assert_allclose(scores.errors[0, shortlist], direct.errors[0], rtol=1e-5)
    np.testing.assert_array_equal(scores.pairs_scored[0, shortlist], direct.pairs_scored[0])
    assert scores.unet_evals[0] == 10 + direct.unet_evals[0]
    assert not scores.survivors[0, np.setdiff1d(np.arange(10), shortlist)].any()
    assert shortlist[direct.predictions()[0]] == scores.predictions()[0]


def test_settings_fitted_on_a_split_noop_gets_right_escalate_none_of_it(demo) -> None:
    """choose_settings on NoOp's own errors of images it classifies correctly: the cascade with those settings
    answers every one of them with NoOp alone."""
    from noop_rt.demo.digits import split_tensors
    from noop_rt.train.cascade_fit import choose_settings

    x, y = split_tensors("val")
    images = x[:120].numpy()
    errors = demo.model.noop_errors(images, demo.model.info.loss).astype(np.float64)
    keep = errors.argmin(axis=1) == y[:120].numpy()  # the part of the split NoOp gets right: perfect on it
    settings = choose_settings(errors[keep], y[:120].numpy()[keep], demo.model.info.tau, target_accuracy=1.0)
    scores, _ = demo.score(images[keep], "cascade", cascade_threshold=settings["threshold"],
                           shortlist=settings["shortlist"])
    assert scores.escalated is not None and not scores.escalated.any()
    assert (scores.unet_evals == 10).all()


def test_choose_settings_by_hand() -> None:
    """Four images, two classes, tau 1: errors chosen so the top-1 probabilities are known."""
    from noop_rt.train.cascade_fit import choose_settings

    p = np.array([0.95, 0.9, 0.7, 0.6])  # top-1 probabilities; the image at 0.7 is misclassified
    gap = np.log(p / (1 - p))  # softmax(-err) over two classes: p = 1 / (1 + exp(-gap))
    errors = np.stack([np.zeros(4), gap], axis=1)  # class 0 predicted everywhere
    labels = np.array([0, 0, 1, 0])
    # target 0.75: answering all four gives 3/4 -> the lowest threshold, 0.6
    assert choose_settings(errors, labels, 1.0, 0.75)["threshold"] == pytest.approx(0.6, abs=1e-6)
    # target 1.0: the misclassified image at 0.7 must escalate -> 0.9 (0.9 and 0.95 both right)
    fitted = choose_settings(errors, labels, 1.0, 1.0)
    assert fitted["threshold"] == pytest.approx(0.9, abs=2e-6)
    assert fitted["error_bound"] == pytest.approx(0.0)  # the best error of every image is 0 here


def test_cascade_config_refuses_bad_settings(demo, examples) -> None:
    images, _ = examples
    with pytest.raises(BadInputError, match="shortlist needs at least 2"):
        demo.classify(images[:1], shortlist=1)
    with pytest.raises(BadInputError, match="threshold is a probability"):
        demo.classify(images[:1], cascade_threshold=1.5)
    with pytest.raises(UsageError, match="did you mean 'pruned'"):
        demo.classify(images[:1], escalate="prunned")


def test_cli_classify_and_eval_report_escalation(tmp_path) -> None:
    runner = CliRunner()
    seven = str(EXAMPLES_DIR / "seven.png")
    out = runner.invoke(app, ["classify", seven, "--method", "cascade", "--cascade-threshold", "1.0", "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    answer = answer[0] if isinstance(answer, list) else answer
    assert answer["escalated"] is True and answer["unet_evals"] > 10 and answer["method"] == "cascade"
    bad = runner.invoke(app, ["classify", seven, "--method", "cascade", "--escalate", "noop"])
    assert bad.exit_code != 0 and "escalation strategy" in bad.output and "Traceback" not in bad.output
    folder = tmp_path / "data" / "seven"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes((EXAMPLES_DIR / "seven.png").read_bytes())
    out = runner.invoke(app, ["eval", "--data", str(tmp_path / "data"), "--method", "cascade", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["method"] == "cascade" and 0.0 <= report["escalated_share"] <= 1.0
    assert report["unet_evals_per_image"] >= 10


def test_a_model_without_a_learned_noise_refuses_cascade(tiny_sd) -> None:
    with pytest.raises(UsageError, match="needs a learned noise"):
        noop_rt.load(tiny_sd, classes=["a", "b"], method="cascade")


def test_train_fits_the_cascade_and_export_carries_it(tiny_ckpt, tiny_bundle) -> None:
    from noop_rt.train.checkpoint import load_checkpoint

    fitted = load_checkpoint(tiny_ckpt).train["cascade"]
    assert 0 < fitted["threshold"] <= 1 and fitted["shortlist"] >= 2
    assert fitted["escalate"] in ("pruned", "adaptive") and set(fitted["candidates"]) == {"pruned", "adaptive"}
    clf = noop_rt.load(tiny_bundle, method="cascade")
    assert clf.model.info.cascade == fitted
    assert not any("no fitted cascade" in n for n in clf.notes)
    config = clf.config("cascade")
    assert config.cascade_threshold == fitted["threshold"] and config.escalate == fitted["escalate"]
    assert config.escalation.loss == "l2"  # the zero-shot error, whatever NoOp's own (l1 here)
    assert clf.config("cascade", loss="huber").escalation.loss == "huber"
