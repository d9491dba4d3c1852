"""The built-in demo: a real trained model that ships in the package, its NoOp checkpoint and ONNX bundle."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from noop_rt.cli import app
from noop_rt.configs import DIGIT_NAMES
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, EXAMPLES_DIR, MODEL_DIR

runner = CliRunner()
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


def truth(path) -> str:
    return path.stem  # examples are named after their class: seven.png


def test_shipped_model_loads_offline_and_fast() -> None:
    """In a fresh interpreter whose sockets refuse to connect: the demo loads from the package, in < 5 s."""
    code = (
        "import socket, time\n"
        "def refuse(*a, **k):\n    raise OSError('network use during demo load')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
        "import diffusers, transformers\n"
        "from noop_rt.backbone import load_backbone\n"
        "start = time.perf_counter()  # the load itself, after the libraries are imported\n"
        "bb = load_backbone('demo')\n"
        "print(time.perf_counter() - start, bb.kind, bb.resolution, bb.source)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    seconds, kind, resolution, source = res.stdout.split()
    assert float(seconds) < 5.0 and (kind, resolution, source) == ("pixel", "16", "demo")
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
    rows = [line for line in res.stdout.splitlines() if ".png" in line]
    assert len(rows) == 10 and "Speed:" in res.stderr
    correct = int(res.stdout.split("/10 correct")[0].split()[-1])
    assert correct >= 9 and sum("✓" in r for r in rows) == correct


def test_shipped_bundle_matches_the_shipped_checkpoint() -> None:
    from noop_rt.bundle import Bundle, sha256_file

    bundle = Bundle.open(BUNDLE_DIR)
    assert bundle.manifest["source_ckpt"]["sha256"] == sha256_file(CKPT_PATH)
    assert sorted(bundle.manifest["classes"]) == sorted(DIGIT_NAMES)
    assert json.loads((BUNDLE_DIR / "validation.json").read_text())["passed"]


def test_fp16_bundle_agrees_with_fp32_torch_on_the_held_out_split(tmp_path) -> None:
    """Export validation of an fp16 demo bundle scores all 360 held-out digits with fp16 onnxruntime and fp32 torch
    and records their top-1 agreement (issue target: >= 99.5 %)."""
    from noop_rt.export import ExportOptions, export_bundle

    report = export_bundle(CKPT_PATH, tmp_path / "half", ExportOptions(precision="fp16"), log=io.StringIO())
    recorded = json.loads((tmp_path / "half" / "validation.json").read_text())
    assert recorded == report.validation
    assert recorded["images"] == "360 held-out demo digits"
    assert recorded["classifier"]["top1_agreement"] >= 0.995, recorded["classifier"]
    assert recorded["passed"]
    assert all(g["max_rel"] < 5e-2 for g in recorded["graphs"].values())


def test_robust_mode_keeps_clean_examples_correct() -> None:
    res = runner.invoke(app, ["classify", *map(str, EXAMPLES), "--robust", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {r["backend"] for r in out} == {"torch"}
    assert sum(r["top"][0]["class"] == truth(EXAMPLES[i]) for i, r in enumerate(out)) >= 9
