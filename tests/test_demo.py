"""The built-in demo: a real trained model that ships in the package, its NoOp checkpoint and ONNX bundle."""

from __future__ import annotations

import io
import json
import time

import torch
from typer.testing import CliRunner

from noop_rt.backbone import load_backbone
from noop_rt.cli import app
from noop_rt.configs import DIGIT_NAMES
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, EXAMPLES_DIR, MODEL_DIR

runner = CliRunner()
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


def truth(path) -> str:
    return path.stem  # examples are named after their class: seven.png


def test_shipped_model_loads_offline_and_fast(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    bb = load_backbone("demo")
    assert time.perf_counter() - start < 5.0
    assert bb.kind == "pixel" and bb.resolution == 16 and bb.source == "demo"
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 1024**2
    assert len(EXAMPLES) == 10 and {truth(p) for p in EXAMPLES} == set(DIGIT_NAMES)


def test_100_noise_baseline_classifies_the_examples() -> None:
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--model", "demo", "--method", "baseline",
                              "--noises", "100", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    correct = sum(r["top"][0]["class"] == truth(EXAMPLES[i]) for i, r in enumerate(out))
    assert correct >= 9, [r["top"][0]["class"] for r in out]
    assert all(r["unet_evals"] == 1000 for r in out)


def test_no_flags_runs_noop_on_onnxruntime_and_is_right() -> None:
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {r["method"] for r in out} == {"noop"} and {r["backend"] for r in out} == {"onnxruntime"}
    assert all(r["unet_evals"] == 10 for r in out)
    assert sum(r["top"][0]["class"] == truth(EXAMPLES[i]) for i, r in enumerate(out)) >= 9
    assert all(0.0 <= t["prob"] <= 1.0 for r in out for t in r["top"])


def test_demo_command_prints_a_table() -> None:
    res = runner.invoke(app, ["demo"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == 10 and "Speed:" in res.stderr


def test_shipped_bundle_matches_the_shipped_checkpoint() -> None:
    from noop_rt.bundle import Bundle, sha256_file

    bundle = Bundle.open(BUNDLE_DIR)
    assert bundle.manifest["source_ckpt"]["sha256"] == sha256_file(CKPT_PATH)
    assert sorted(bundle.manifest["classes"]) == sorted(DIGIT_NAMES)
    assert json.loads((BUNDLE_DIR / "validation.json").read_text())["passed"]


def test_fp16_bundle_agrees_with_fp32_torch_on_the_held_out_split(tmp_path) -> None:
    from noop_rt.bundle import Bundle
    from noop_rt.checkpoint import load_checkpoint
    from noop_rt.demo.digits import split_tensors
    from noop_rt.export import ExportOptions, export_bundle
    from noop_rt.runtime.classifier import Classifier, ClassSpec, StrategyOptions
    from noop_rt.runtime.onnx_backend import OnnxBackend
    from noop_rt.runtime.torch_backend import TorchBackend

    report = export_bundle(CKPT_PATH, tmp_path / "half", ExportOptions(precision="fp16"), log=io.StringIO())
    assert report.validation["passed"]
    ckpt = load_checkpoint(CKPT_PATH)
    spec = ClassSpec(ckpt.classes, ckpt.prompts, ckpt.class_embeddings, ckpt.tau, ckpt.t_star, ckpt.loss)
    x, _ = split_tensors("test")
    ref = Classifier(TorchBackend(load_backbone("demo"), ckpt.noise_model()), spec)
    half = Classifier(OnnxBackend(Bundle.open(tmp_path / "half"), device="cpu"), spec)
    opts = StrategyOptions(method="noop")
    agree = []
    for i in range(0, len(x), 60):
        a, _ = ref.score(x[i:i + 60], opts)
        b, _ = half.score(x[i:i + 60], opts)
        agree.append(a.predictions() == b.predictions())
    agreement = float(torch.cat(agree).float().mean())
    assert agreement >= 0.995, agreement


def test_robust_mode_keeps_clean_examples_correct() -> None:
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--robust", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {r["backend"] for r in out} == {"torch"}
    assert sum(r["top"][0]["class"] == truth(EXAMPLES[i]) for i, r in enumerate(out)) >= 9
