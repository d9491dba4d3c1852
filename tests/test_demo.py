"""The built-in demo: a real trained model that ships in the package, its NoOp checkpoint and ONNX bundle.
The truth of each example is its file name (`seven.png` is a seven), never the code under test."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from noop_rt.cli import app
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, DIGIT_NAMES, EXAMPLES_DIR, MODEL_DIR

runner = CliRunner()
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


def truth(path) -> str:
    return path.stem


def correct(out: list[dict]) -> int:
    return sum(r["top"][0]["class"] == truth(EXAMPLES[i]) for i, r in enumerate(out))


def test_shipped_model_loads_offline() -> None:
    """In a fresh interpreter whose sockets refuse to connect, the demo backbone loads from the package."""
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n    raise OSError('network use during demo load')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
        "from noop_rt.train.backbones import load_backbone\n"
        "bb = load_backbone('demo')\n"
        "print(bb.kind, bb.resolution, bb.source)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["pixel", "16", "demo"]
    assert len(EXAMPLES) == 10 and {truth(p) for p in EXAMPLES} == set(DIGIT_NAMES)
    assert sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file()) <= 20 * 1024**2


def test_100_noise_baseline_classifies_the_examples() -> None:
    """On the shipped bundle: the scorer graph, 100 (t, eps) pairs x 10 classes per image."""
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--method", "baseline", "--noises", "100", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert correct(out) >= 9, [r["top"][0]["class"] for r in out]
    assert all(r["unet_evals"] == 1000 for r in out)


def test_no_flags_runs_noop_on_onnxruntime_and_is_right() -> None:
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {r["method"] for r in out} == {"noop"} and {r["backend"] for r in out} == {"onnxruntime"}
    assert all(r["unet_evals"] == 10 for r in out)
    assert correct(out) == 10


def test_the_bundle_and_the_checkpoint_give_the_same_answers() -> None:
    a = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--json", "--top-k", "10"])
    b = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--ckpt", str(CKPT_PATH), "--json", "--top-k", "10"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for x, y in zip(json.loads(a.stdout), json.loads(b.stdout), strict=True):
        assert y["backend"] == "torch" and x["top"][0]["class"] == y["top"][0]["class"]
        ex, ey = {t["class"]: t["error"] for t in x["top"]}, {t["class"]: t["error"] for t in y["top"]}
        assert max(abs(ex[k] - ey[k]) for k in ex) < 1e-5


def test_demo_command_prints_a_table() -> None:
    res = runner.invoke(app, ["demo"])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if ".png" in line]
    assert len(rows) == 10 and "Speed:" in res.stderr
    cells = [[c.strip() for c in row.split("│")] for row in rows]  # "", image, true, predicted, prob, ✓, ...
    assert all(c[3] == c[1].removesuffix(".png") for c in cells), cells
    assert res.stdout.count("✓") == 10 and "10/10 correct" in res.stdout


def test_shipped_bundle_comes_from_the_shipped_checkpoint() -> None:
    """The manifest's source checkpoint hash is the shipped file's (computed here with hashlib)."""
    import hashlib

    manifest = json.loads((BUNDLE_DIR / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["name"] == "digits"
    assert manifest["source_ckpt"]["sha256"] == hashlib.sha256(CKPT_PATH.read_bytes()).hexdigest()
    assert sorted(manifest["classes"]) == sorted(DIGIT_NAMES)


def test_fp16_bundle_agrees_with_fp32_torch_on_held_out_digits(tmp_path) -> None:
    """An fp16 demo bundle, run on onnxruntime CPU, against fp32 torch on 100 held-out digits, measured here (not
    read from the export's own report): at most one disagreement. (All 360: benchmarks/export_parity.py.)"""
    import numpy as np

    import noop_rt
    from noop_rt.build.export import ExportOptions, export_bundle
    from noop_rt.demo.digits import split_tensors

    export_bundle(CKPT_PATH, tmp_path / "half", ExportOptions(precision="fp16", validate_images=EXAMPLES),
                  log=io.StringIO())
    images, labels = split_tensors("test")
    x, labels = images.numpy()[:100], labels[:100]
    half = noop_rt.load(tmp_path / "half").classify(x, top_k=1)
    full = noop_rt.load(CKPT_PATH, backend="torch").classify(x, top_k=1)
    agree = np.mean([a.label == b.label for a, b in zip(half, full, strict=True)])
    assert len(half) == 100 and agree >= 0.99, agree
    names = list(DIGIT_NAMES)
    accuracy = np.mean([names.index(r.label) == int(y) for r, y in zip(half, labels, strict=True)])
    assert accuracy >= 0.97, accuracy


def test_robust_mode_keeps_clean_examples_correct() -> None:
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--robust", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {r["backend"] for r in out} == {"torch"}
    assert correct(out) >= 9
