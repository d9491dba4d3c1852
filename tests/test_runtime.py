"""The torch-free runtime: the Python API, the opener, opening checks, class sets and tau (the layering rule is
pyproject.toml's import-linter contracts, tests/test_layers.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import noop_rt
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, EXAMPLES_DIR
from noop_rt.runtime.errors import BadInputError, BundleError, UsageError

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
REPO = Path(__file__).resolve().parents[1]
SEVEN = EXAMPLES_DIR / "seven.png"
BLOCK_TORCH = ("import sys\n"
               "for m in ('torch', 'diffusers', 'transformers', 'accelerate'):\n"
               "    sys.modules[m] = None  # any import of them now raises ImportError\n")


def test_the_demo_classifies_with_torch_unimportable() -> None:
    """In a process where torch, diffusers and transformers cannot be imported: the API and the CLI classify
    the demo, and none of them (nor onnx) ends up loaded."""
    code = BLOCK_TORCH + (
        "import json, noop_rt\n"
        "from noop_rt.demo import EXAMPLES_DIR\n"
        "clf = noop_rt.load()\n"
        "paths = sorted(EXAMPLES_DIR.glob('*.png'))\n"
        "labels = [r.label for r in clf.classify(paths)]\n"
        "print(json.dumps({'labels': labels, 'truth': [p.stem for p in paths], 'backend': clf.backend,\n"
        "                  'loaded': sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx')\n"
        "                                   if sys.modules.get(m) is not None)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["backend"] == "onnxruntime" and out["loaded"] == []
    assert sum(a == b for a, b in zip(out["labels"], out["truth"], strict=True)) >= 9
    cli = BLOCK_TORCH + ("sys.argv = ['noop-rt', 'classify', sys.argv[1], '--json']\n"
                         "from noop_rt.cli import run\nrun()\n")
    res = subprocess.run([sys.executable, "-c", cli, str(SEVEN)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["top"][0]["class"] == "seven"


def test_commands_that_need_torch_say_which_extra(tmp_path) -> None:
    """Without torch: a checkpoint, train and export each fail with one line naming the train extra as this clone
    installs it (pip install -e 'CLONE[train]'), exit 1."""
    for args in (["classify", str(SEVEN), "--ckpt", str(CKPT_PATH)], ["export", "--ckpt", str(CKPT_PATH)],
                 ["classify", str(SEVEN), "--backend", "torch"],
                 ["train", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt")]):
        code = BLOCK_TORCH + f"sys.argv = ['noop-rt', *{args!r}]\nfrom noop_rt.cli import run\nrun()\n"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 1 and len(lines) == 1, res.stderr
        assert f"pip install -e '{REPO}[train]'" in lines[0] or "pip install -e '.[train]'" in lines[0], lines
        if "--backend" in args:  # no checkpoint was named: the line speaks of the flag that was
            assert lines[0].startswith("error: --backend torch needs torch"), lines


def test_api_takes_paths_pil_images_and_arrays() -> None:
    clf = noop_rt.load()
    assert (clf.backend, clf.method, len(clf.classes)) == ("onnxruntime", "noop", 10)
    one = clf.classify(SEVEN, top_k=3)
    assert isinstance(one, noop_rt.Result) and one.label == "seven" and len(one.top) == 3
    assert one.top[0].prob >= one.top[1].prob >= one.top[2].prob
    assert one.unet_evals == 10 and one.calibrated
    assert set(one.timings) == {"preprocess", "model", "scoring"}
    pil = Image.open(SEVEN)
    rgb = np.asarray(pil.convert("RGB"))
    many = clf.classify([str(SEVEN), pil, rgb])
    assert [r.label for r in many] == ["seven"] * 3
    np.testing.assert_allclose([t.error for t in many[0].top], [t.error for t in many[2].top], rtol=1e-6)
    assert many[0].image == str(SEVEN) and many[1].image is None
    with pytest.raises(BadInputError, match="array of shape"):
        clf.classify(np.zeros((5, 5, 7), np.uint8))
    with pytest.raises(BadInputError, match="no images"):
        clf.classify([])


def test_noop_probabilities_use_the_fitted_tau() -> None:
    """softmax(-tau * err) with the manifest's tau, recomputed here from the reported errors."""
    clf = noop_rt.load()
    tau = json.loads((BUNDLE_DIR / "manifest.json").read_text())["tau"]
    r = clf.classify(SEVEN, top_k=10)
    errors = np.array([t.error for t in r.top])
    expected = np.exp(-tau * (errors - errors.min()))
    expected /= expected.sum()
    np.testing.assert_allclose([t.prob for t in r.top], expected, rtol=1e-5, atol=1e-9)


def test_stale_tau_falls_back_to_the_uncalibrated_scale() -> None:
    """tau was fitted for the trained classes and loss: another loss or class set gets 1/std (and says so)."""
    trained = noop_rt.load().classify(SEVEN, top_k=10)
    other_loss = noop_rt.load(loss="l2").classify(SEVEN, top_k=10)
    subset = noop_rt.load(classes=["seven", "one", "nine"]).classify(SEVEN, top_k=3)
    assert trained.calibrated and not other_loss.calibrated and not subset.calibrated
    for r in (other_loss, subset):
        errors = np.array([t.error for t in r.top])
        scale = 1 / errors.std(ddof=1)
        expected = np.exp(-scale * (errors - errors.min()))
        np.testing.assert_allclose([t.prob for t in r.top], expected / expected.sum(), rtol=1e-5, atol=1e-9)
    # the l2 errors are another norm: not the l1 errors of the trained path
    assert abs(other_loss.top[0].error - trained.top[0].error) > 1e-4
    # a subset of the trained classes keeps their cached embeddings: same errors as in the full set
    full = {t.label: t.error for t in trained.top}
    for t in subset.top:
        assert t.error == pytest.approx(full[t.label], rel=1e-5)


def test_close_names_are_flagged_and_new_classes_are_zero_shot() -> None:
    clf = noop_rt.load(classes=["seven", "nien", "one"])
    assert any("'nien' is not a trained class (did you mean 'nine'?)" in n for n in clf.notes)
    r = clf.classify(SEVEN)
    assert r.zero_shot == ["nien"] and r.to_json()["zero_shot_classes"] == ["nien"] and not r.calibrated
    assert {t.label for t in r.top} == {"seven", "nien", "one"}


def test_openvino_agrees_with_onnxruntime() -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from noop_rt.demo.digits import split_tensors

    ort = noop_rt.load(backend="onnxruntime")
    ov = noop_rt.load(backend="openvino")
    held_out = split_tensors("test")[0].numpy()  # all 360 held-out digits: the same top-1 on both engines
    a, b = ort.classify(held_out, top_k=10), ov.classify(held_out, top_k=10)
    assert ov.backend == "openvino" and [x.label for x in a] == [y.label for y in b]
    for x, y in zip(a, b, strict=True):
        ex, ey = {t.label: t.error for t in x.top}, {t.label: t.error for t in y.top}
        assert max(abs(ex[k] - ey[k]) for k in ex) < 3e-3  # OpenVINO's CPU kernels round differently (~1e-3)
    # other class sets run through the encoder, noise and scorer graphs on OpenVINO: same errors as onnxruntime
    sub_ort = noop_rt.load(backend="onnxruntime", classes=["seven", "one"]).classify(SEVEN)
    sub_ov = noop_rt.load(backend="openvino", classes=["seven", "one"]).classify(SEVEN)
    assert [t.error for t in sub_ov.top] == pytest.approx([t.error for t in sub_ort.top], abs=1e-3)


def test_openvino_precision_is_said_and_can_be_held_to_f32(monkeypatch) -> None:
    """OpenVINO's CPU default runs fp32 graphs in bf16 where the CPU has AVX512_BF16/AMX: the runner reads that back,
    a note says it, NOOP_RT_OPENVINO_PRECISION=f32 compiles the layers in f32 (read from OpenVINO's runtime graph,
    with errors closer to onnxruntime's), and a wrong value is a one-line error."""
    ov_module = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from noop_rt.runtime.backends.openvino_runner import PRECISION_ENV
    from noop_rt.runtime.errors import BadInputError

    default = ov_module.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    clf = noop_rt.load(backend="openvino")
    assert clf.model.runner.execution_precision == default
    assert any("runs this fp32 bundle in" in n for n in clf.notes) == (default != "f32")
    monkeypatch.setenv(PRECISION_ENV, "f32")
    held = noop_rt.load(backend="openvino")
    assert held.model.runner.execution_precision == "f32" and not any("runs this fp32" in n for n in held.notes)
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLES[:2]])
    from noop_rt.runtime.images import as_model_input

    x = np.stack([as_model_input(i, clf.resolution) for i in x])
    held.score(x)
    request = held.model.runner._request("classifier", {"image": x})
    kinds = {str(op.get_rt_info()["runtimePrecision"].astype(str))
             for op in request.get_compiled_model().get_runtime_model().get_ordered_ops()
             if "layerType" in op.get_rt_info() and str(op.get_rt_info()["layerType"].astype(str)) == "Convolution"}
    assert kinds == {"f32"}, kinds
    ref = noop_rt.load(backend="onnxruntime").score(x)[0].errors
    assert np.abs(held.score(x)[0].errors - ref).max() < 1e-4 * np.abs(ref).max() + 1e-6
    monkeypatch.setenv(PRECISION_ENV, "fp64")
    with pytest.raises(BadInputError, match=PRECISION_ENV):
        noop_rt.load(backend="openvino")


def test_scorer_path_equals_the_classifier_graph() -> None:
    """NoOp through encoder + noise + scorer graphs (used for another loss or engine) equals the one graph."""
    clf = noop_rt.load()
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLES])
    from noop_rt.runtime.images import as_model_input

    x = np.stack([as_model_input(i, clf.resolution) for i in images])
    direct = clf.model.noop_errors(x, clf.info.loss)
    z0 = clf.model.encode(x)
    via = clf.model.class_errors(z0, clf.model.noise(z0), np.full(len(x), clf.info.t_star), None, clf.info.loss)
    np.testing.assert_allclose(direct, via, rtol=1e-5, atol=1e-7)


def test_unknown_values_and_sources_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        noop_rt.load(backend="onnxrt")
    with pytest.raises(UsageError, match="did you mean 'pruned'"):
        noop_rt.load(method="prune")
    with pytest.raises(BadInputError, match="neither a noop-rt bundle"):
        noop_rt.load(tmp_path)
    with pytest.raises(BadInputError, match="checkpoint not found"):
        noop_rt.load(tmp_path / "x.pt")
    with pytest.raises(UsageError, match="runs exported bundles"):
        noop_rt.load(CKPT_PATH, backend="onnxruntime")
    with pytest.raises(UsageError, match="torch backend runs checkpoints"):
        noop_rt.load(BUNDLE_DIR, backend="torch")


def test_opening_rehashes_only_changed_files(tmp_path, monkeypatch) -> None:
    import noop_rt.runtime.bundle as bundle_mod

    b = tmp_path / "digits"
    shutil.copytree(BUNDLE_DIR, b, ignore=shutil.ignore_patterns(".verified.json"))
    hashed: list[str] = []
    real = bundle_mod.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    files = json.loads((b / "manifest.json").read_text())["files"]
    bundle_mod.Bundle.open(b)
    assert sorted(hashed) == sorted(Path(f).name for f in files)  # first open: everything
    hashed.clear()
    bundle_mod.Bundle.open(b)
    assert hashed == []  # nothing changed since it was verified
    (b / "scorer.onnx").touch()  # a new modification time: re-hashed (same bytes, still valid)
    bundle_mod.Bundle.open(b)
    assert hashed == ["scorer.onnx"]
    data = bytearray((b / "noise.onnx").read_bytes())
    data[100] ^= 1
    (b / "noise.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"noise\.onnx does not match the sha256"):
        bundle_mod.Bundle.open(b)


def test_a_read_only_bundle_remembers_its_verification_in_the_user_cache(tmp_path, monkeypatch) -> None:
    """An installed package's bundle is not writable (simulated: tests run as root, which may write anywhere)."""
    import noop_rt.runtime.bundle as bundle_mod

    b = tmp_path / "ro"
    shutil.copytree(BUNDLE_DIR, b, ignore=shutil.ignore_patterns(".verified.json"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_access = bundle_mod.os.access
    monkeypatch.setattr(bundle_mod.os, "access", lambda p, mode: False if Path(p) == b else real_access(p, mode))
    bundle_mod.Bundle.open(b)
    assert not (b / ".verified.json").exists()
    assert len(list((tmp_path / "cache" / "noop-rt" / "verified").glob("*.json"))) == 1


def test_drift_warning_is_silent_on_held_out_digits_and_loud_on_a_shifted_domain() -> None:
    """The demo's 360 held-out digits (shuffled, and sorted by class as an image-folder tree is read: a window then
    holds one class, and some classes are less sure than others) never warn; the same digits inverted (white
    background, a domain the few-shot set never showed) warn once, with the retrain hint."""
    from noop_rt.demo import DIGIT_NAMES
    from noop_rt.demo.digits import split_tensors

    x, y = (t.numpy() for t in split_tensors("test"))
    names = np.array([DIGIT_NAMES[int(i)] for i in y])
    orders = [np.random.default_rng(seed).permutation(len(x)) for seed in range(2)]
    orders += [np.argsort(names, kind="stable"), np.argsort(names, kind="stable")[::-1], np.argsort(y, kind="stable")]
    for order in orders:
        clf = noop_rt.load()
        warnings: list[str] = []
        clf.on_drift = warnings.append
        clf.classify(x[order], top_k=1)
        assert warnings == [] and clf.drift.report()["seen"] == 360
    clf = noop_rt.load()
    warnings = []
    clf.on_drift = warnings.append
    clf.classify(-x, top_k=1)
    report = clf.drift.report()
    assert len(warnings) == 1 and "noop-rt train" in warnings[0] and report["warned"]
    assert report["share_below_val_p05_top1_prob"] > 0.2  # against 5 % on validation


def test_drift_tails_and_class_rates() -> None:
    from scipy import stats

    from noop_rt.runtime.drift import DriftMonitor, binomial_tail, poisson_binomial_tail, wilson_upper

    # equal rates: the binomial law, against scipy
    assert poisson_binomial_tail(17, np.full(100, 0.05)) == pytest.approx(stats.binom.sf(16, 100, 0.05), rel=1e-9)
    assert binomial_tail(17, 100, 0.05) == pytest.approx(stats.binom.sf(16, 100, 0.05), rel=1e-9)
    # unequal rates: against a Monte Carlo draw of the trials
    rates = np.random.default_rng(0).uniform(0, 0.4, 60)
    draws = (np.random.default_rng(1).random((200_000, 60)) < rates).sum(axis=1)
    assert poisson_binomial_tail(18, rates) == pytest.approx((draws >= 18).mean(), abs=3e-3)
    # Wilson's upper bound of 0 of n is z^2 / (n + z^2) in closed form
    assert wilson_upper(0, 30, z=1.645) == pytest.approx(1.645**2 / (30 + 1.645**2))
    assert wilson_upper(0, 30) == pytest.approx(1 / 31)
    # a profile without per-class counts expects 5 % of every input: 17 of 100 alarm, 16 do not
    for count, alarms in ((16, False), (17, True)):
        monitor = DriftMonitor.from_profile({"top1_prob_p05": 0.5, "best_error_p95": 1.0})
        probs = np.where(np.arange(100) < count, 0.1, 0.9)
        assert (monitor.update(probs, np.zeros(100), np.zeros(100, dtype=int)) is not None) is alarms
    # with per-class counts, a window of a class often unsure on validation needs more to alarm
    prof = {"top1_prob_p05": 0.5, "best_error_p95": 1.0, "per_class_predicted": [30, 30],
            "per_class_below_p05": [6, 0]}
    monitor = DriftMonitor.from_profile(prof)
    assert monitor.update(np.where(np.arange(100) < 25, 0.1, 0.9), np.zeros(100), np.zeros(100, dtype=int)) is None
    monitor = DriftMonitor.from_profile(prof)
    assert monitor.update(np.where(np.arange(100) < 25, 0.1, 0.9), np.zeros(100), np.ones(100, dtype=int)) is not None


def test_batch_and_eval_report_drift(tmp_path) -> None:
    from typer.testing import CliRunner

    from noop_rt.cli import app
    from noop_rt.demo import DIGIT_NAMES
    from noop_rt.demo.digits import split_tensors, write_image_folders

    x, y = split_tensors("test")
    for i in range(len(x)):  # inverted digits as an image-folder tree
        img = ((-x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        folder = tmp_path / "inverted" / DIGIT_NAMES[int(y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    write_image_folders(tmp_path / "own")  # the demo's own held-out digits: never a warning
    res = CliRunner().invoke(app, ["batch", str(tmp_path / "own" / "test"), "--out", str(tmp_path / "own.jsonl"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert "drift" not in res.stderr and json.loads(res.stdout)["drift"]["warned"] is False
    res = CliRunner().invoke(app, ["batch", str(tmp_path / "inverted"), "--out", str(tmp_path / "o.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert "warning: drift:" in res.stderr
    assert json.loads(res.stdout)["drift"]["warned"] is True
    res = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "inverted"), "--json"])
    assert res.exit_code == 0, res.output
    assert "warning: drift:" in res.stderr and json.loads(res.stdout)["drift"]["warned"] is True


def test_an_overflowing_fp16_graph_is_refused_naming_it(tmp_path) -> None:
    """A real ONNX graph that overflows (x * 1e30 * 1e30 = inf in float32; onnxruntime's CPU provider computes fp16
    arithmetic in fp32, so an fp16 overflow is not reproducible on it), labelled as an fp16 bundle: the errors are
    refused with a line naming the graph and suggesting the fp32 bundle, never ranked."""
    import onnx
    from onnx import TensorProto, helper

    from noop_rt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
    from noop_rt.runtime.bundle import Bundle
    from noop_rt.runtime.errors import NonFiniteError
    from noop_rt.runtime.graph_model import GraphModel, ModelInfo

    big = helper.make_tensor("big", TensorProto.FLOAT, [], [1e30])
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Mul", ["m", "big"], ["h1"]), helper.make_node("Mul", ["h1", "big"], ["errors"]),
             helper.make_node("Softmax", ["errors"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                 ["B", 3, 4, 4])],
                              [helper.make_tensor_value_info("errors", TensorProto.FLOAT, ["B", 3]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 3])],
                              initializer=[big])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    bundle = Bundle(tmp_path, {"graphs": {"classifier": {"file": "c.onnx"}}})
    info = ModelInfo(name="x", source="bundle", location=str(tmp_path), resolution=4, latent_shape=(3, 4, 4),
                     num_train_timesteps=1000, prediction_type="epsilon", max_batch=6, fingerprint="", t_star=1,
                     tau=1.0, loss="l2", precision="fp16")
    model = GraphModel(OnnxRuntimeRunner(bundle, "cpu"), info, None, np.zeros((3, 1, 1), np.float32))
    image = np.full((2, 3, 4, 4), 0.5, np.float32)
    with pytest.raises(NonFiniteError, match=r"classifier graph produced NaN or infinite values.*--fp32"):
        model.noop_errors(image, "l2")
    small = np.full((2, 3, 4, 4), 1e-25, np.float32)  # stays finite: scored as usual
    assert np.isfinite(model.noop_errors(small, "l2")).all()


def test_adaptive_and_pruned_give_the_same_errors_on_torch_and_onnxruntime() -> None:
    """Many scorer calls with shrinking class subsets: each call must use its own classes' embeddings (a torch
    backend that reused a stale upload would score the wrong classes)."""
    torch_clf = noop_rt.load(CKPT_PATH, backend="torch")
    ort_clf = noop_rt.load()
    for method, options in (("adaptive", {"stages": ((2, 4), (6, 2), (12, 1))}), ("pruned", {"pairs": 20})):
        a = torch_clf.classify(EXAMPLES, method=method, top_k=10, **options)
        b = ort_clf.classify(EXAMPLES, method=method, top_k=10, **options)
        for x, y in zip(a, b, strict=True):
            assert x.unet_evals == y.unet_evals and x.label == y.label == Path(x.image).stem
            ex, ey = {t.label: t.error for t in x.top}, {t.label: t.error for t in y.top}
            assert max(abs(ex[k] - ey[k]) for k in ex) < 1e-5


def test_devices_are_checked_and_the_gpu_index_is_honoured() -> None:
    from noop_rt.runtime.backends.onnxruntime_runner import providers

    assert providers("cuda:3") == [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    assert providers("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert providers("cpu") == ["CPUExecutionProvider"]
    for bad in ("gpu", "cuda1", "cuda:x", "mps"):
        with pytest.raises(UsageError, match="unknown device"):
            noop_rt.load(device=bad)


def test_load_refuses_unknown_keywords_with_the_closest_name() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'mehtod' \(did you mean 'method'\?\)"):
        noop_rt.load(mehtod="baseline")
    with pytest.raises(TypeError, match=r"'pairz' \(did you mean 'pairs'\?\)"):
        noop_rt.load(noop_rt.LoadOptions(), pairz=5)


def test_load_options_is_the_one_request() -> None:
    """A LoadOptions opens what the same keywords open, and keywords passed beside it override its fields."""
    request = noop_rt.LoadOptions.of(None, classes="seven,one", pairs=3)
    assert request.classes == ["seven", "one"] and request.strategy == {"pairs": 3}
    clf = noop_rt.load(request, method="baseline")
    assert (clf.classes, clf.method) == (["seven", "one"], "baseline")
    assert clf.classify(SEVEN).unet_evals == 3 * 2  # 3 pairs x 2 classes: the strategy option reached the classifier


def test_classify_takes_a_preprocessed_batch_and_refuses_a_bad_top_k() -> None:
    clf = noop_rt.load()
    x = np.stack([_preprocessed(SEVEN, clf.resolution)] * 2)
    results = clf.classify(x, top_k=2)
    assert [r.label for r in results] == ["seven", "seven"] and all(r.image is None for r in results)
    for bad in (0, -1, 1.5):
        with pytest.raises(BadInputError, match="top_k"):
            clf.classify(SEVEN, top_k=bad)


def _preprocessed(path: Path, resolution: int) -> np.ndarray:
    from noop_rt.runtime.images import load_image

    return load_image(path, resolution)


def test_a_graph_refuses_feeds_that_do_not_fit_in_one_line() -> None:
    """The runner contract checks feeds before the engine: the error names the graph and the input."""
    runner = noop_rt.load().model.runner
    with pytest.raises(BadInputError, match=r"vae_encoder graph's input 'image' has shape \(1, 3, 8, 8\); expected "
                                            r"\(batch, 3, 16, 16\)"):
        runner.run("vae_encoder", {"image": np.zeros((1, 3, 8, 8), np.float32)}, ["z0"])
    with pytest.raises(BadInputError, match=r"input 'image' is float64; expected float32"):
        runner.run("vae_encoder", {"image": np.zeros((1, 3, 16, 16))}, ["z0"])
    z = np.zeros((2, 1, 16, 16), np.float32)  # the demo's pixel-space latent: 1 x 16 x 16
    with pytest.raises(BadInputError, match=r"'z0' and 'eps' disagree on the batch axis \(2 vs 1\)"):
        runner.run("scorer", {"z0": z, "eps": z[:1], "timestep": np.zeros(2, np.float32),
                              "class_embeddings": np.zeros((10, 8, 64), np.float32)}, ["errors_l2"])


def test_install_hints_fit_the_installation(monkeypatch) -> None:
    """From a clone pip finds no noop-rt on the index, so the hint installs the clone; a wheel names the package."""
    from noop_rt.runtime import extras

    assert extras.source_checkout() == REPO
    assert extras.install_hint("train") in (f"pip install -e '{REPO}[train]'", "pip install -e '.[train]'")
    monkeypatch.setattr(extras, "source_checkout", lambda: None)
    assert extras.install_hint("openvino") == "pip install 'noop-rt[openvino]'"


def test_load_options_normalise_whatever_way_they_are_made(tmp_path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("class,prompt\nseven,a handwritten digit seven\none,a handwritten digit one\n")
    made = noop_rt.LoadOptions(classes="seven,one", prompts=str(prompts), engines="e", strategy={"loss": None})
    assert made.classes == ["seven", "one"] and made.prompts == {"seven": "a handwritten digit seven",
                                                                  "one": "a handwritten digit one"}
    assert made.engines == Path("e") and made.strategy == {}
    assert noop_rt.load(made).classes == ["seven", "one"]
    with pytest.raises(TypeError, match="pairs=N"):
        noop_rt.load(noises=5)
    with pytest.raises(UsageError, match="did you mean 'bundle'"):
        noop_rt.load(kind="bundel")
    with pytest.raises(TypeError, match=r"'mehtod' \(did you mean 'method'\?\)"):
        noop_rt.load().classify(SEVEN, mehtod="noop")


def test_bytes_and_unit_range_arrays() -> None:
    clf = noop_rt.load()
    assert clf.classify(SEVEN.read_bytes()).label == "seven"
    x = _preprocessed(SEVEN, clf.resolution)
    with pytest.raises(BadInputError, match=r"\[0, 1\]"):
        clf.classify((x + 1) / 2)  # scaled to [0, 1]: refused, not silently wrong
    with pytest.raises(BadInputError, match="preprocessed batch must be float"):
        clf.classify(np.zeros((2, 3, 16, 16), np.uint8))
    white = np.ones((3, 16, 16), np.float32)  # a plain white image is a valid preprocessed image
    assert clf.classify(white).label in clf.classes


def test_a_manifest_with_two_class_names_swapped_is_refused(tmp_path) -> None:
    """manifest.json is the one file of a bundle that no hash covers; the classifier graph's metadata does."""
    from typer.testing import CliRunner

    from noop_rt.cli import app

    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, copy, ignore=shutil.ignore_patterns(".verified.json"))
    manifest = json.loads((copy / "manifest.json").read_text())
    classes = manifest["classes"]
    i, j = classes.index("six"), classes.index("seven")
    classes[i], classes[j] = classes[j], classes[i]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"names class '(six|seven)' where it was exported with '(seven|six)'"):
        noop_rt.load(copy)
    for args in (["classify", str(SEVEN), "--bundle", str(copy)], ["verify", str(copy)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "edited manifest" in res.stderr, res.output


def test_an_image_unlike_the_training_data_says_so() -> None:
    """Its best error above every validation image's (the manifest's cascade fit, read here): a remark in the
    result's warnings, which `classify --json`, batch rows and the server's answers carry; a typical image has
    none."""
    import json

    from PIL import Image, ImageOps

    from noop_rt.demo import BUNDLE_DIR, EXAMPLES_DIR

    bound = json.loads((BUNDLE_DIR / "manifest.json").read_text())["cascade"]["error_bound"]
    zero = Image.open(EXAMPLES_DIR / "zero.png").convert("RGB")
    clf = noop_rt.load()
    typical, inverted = clf.classify([np.asarray(zero), np.asarray(ImageOps.invert(zero))], top_k=1)
    assert typical.top[0].error <= bound and typical.warnings == []
    assert inverted.top[0].error > bound
    assert any("unlike the training data" in w for w in inverted.to_json()["warnings"])
