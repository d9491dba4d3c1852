"""The benchmark is not a test of speed: tiny runs on the built-in demo check its report, what it skips and why, that
its bundle path runs without torch, and the start-up measurement. No timing is asserted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from noop_rt.cli import app
from noop_rt.demo import BUNDLE_DIR, CKPT_PATH, DIGIT_NAMES, EXAMPLES_DIR
from noop_rt.jobs.bench import BenchOptions, _percentile, bench_command, resolve_sources, stats
from noop_rt.jobs.startup import startup_line
from noop_rt.runtime.errors import BadInputError, UsageError

REPO = Path(__file__).resolve().parents[1]
DEMO_CLASSES = len(DIGIT_NAMES)  # 10 digits
TIMING_KEYS = {"p50_ms", "p95_ms", "images_per_s", "unet_evals_per_image"}


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench_images")
    for name in ("seven.png", "two.png"):
        shutil.copy(EXAMPLES_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def demo_report(two_images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One tiny run: torch + onnxruntime on the demo, and tensorrt pointed at an empty engine folder."""
    options = BenchOptions(backends=["torch", "onnxruntime", "tensorrt"], baseline_noises=4,
                           baseline_measured_pairs=2, runs=2, warmup=1, startup=False)
    no_engines = tmp_path_factory.mktemp("no_engines")
    return bench_command(options, images=two_images, engines=no_engines)


def test_demo_report_counts_unet_evals_from_the_class_count(demo_report) -> None:
    report, _ = demo_report
    assert report["classes"] == DEMO_CLASSES and report["resolution"] == 16 and report["images"] == 2
    assert set(report["backends"]) == {"torch", "onnxruntime"}
    for b in report["backends"].values():
        assert set(b["noop"]) >= TIMING_KEYS and set(b["baseline"]) >= TIMING_KEYS
        assert b["noop"]["unet_evals_per_image"] == DEMO_CLASSES  # NoOp: one UNet pass per class
        assert b["baseline"]["unet_evals_per_image"] == 4 * DEMO_CLASSES  # 4 noises x every class
        assert b["baseline"]["extrapolated"] is True and b["baseline"]["measured_pairs"] == 2
        for method in ("noop", "baseline"):
            s = b[method]
            assert s["p50_ms"] > 0 and math.isfinite(s["images_per_s"])
            assert s["p95_ms"] is None and s["timed_runs"] < 20  # a p95 of 2 runs is not reported
        # the speed-up is the ratio of the two p50s measured in this run (not a constant or an estimate)
        assert b["speedup_vs_baseline"] == pytest.approx(b["baseline"]["p50_ms"] / b["noop"]["p50_ms"])
    assert report["backends"]["torch"]["device"] == "cpu"


def test_speedup_vs_torch_when_torch_is_benched(demo_report) -> None:
    report, table = demo_report
    ratios = report["speedup_vs_torch"]
    assert set(ratios) == {"torch", "onnxruntime"} and ratios["torch"] == 1.0
    nv = report["backends"]
    assert ratios["onnxruntime"] == nv["torch"]["noop"]["p50_ms"] / nv["onnxruntime"]["noop"]["p50_ms"]
    assert "onnxruntime vs torch eager" in table
    # torch is installed here, so the demo UNet's forward is counted: 3.7 M parameters at 16x16 come to ~0.37 GFLOP
    assert 0.2 < report["unet_gflop_per_sample"] < 0.6


def test_unavailable_tensorrt_is_skipped_with_its_reason(demo_report) -> None:
    report, table = demo_report
    assert "tensorrt" not in report["backends"]
    why = report["skipped"]["tensorrt"]
    assert "tensorrt" in why.lower() or "engines" in why
    assert f"skipped tensorrt: {why}" in table


def test_bench_cli_exact_baseline_and_no_torch_ratio(two_images: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = CliRunner().invoke(app, ["bench", "--backends", "onnxruntime", "--runs", "2", "--baseline-noises", "2",
                                   "--measured-pairs", "5", "--images", str(two_images), "--no-startup",
                                   "--out", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    base = report["backends"]["onnxruntime"]["baseline"]
    assert base["extrapolated"] is False and base["measured_pairs"] == 2  # measured = min(5, 2) = all of them
    assert base["unet_evals_per_image"] == 2 * DEMO_CLASSES
    assert "speedup_vs_torch" not in report and "startup" not in report and "skipped" not in report
    assert {"cpu", "onnxruntime", "torch"} <= set(report["machine"])
    assert png.stat().st_size > 1000 and "speed-up" in res.stdout and "extrapolated" not in res.stdout


def test_unknown_names_are_usage_errors_with_the_close_match(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        bench_command(BenchOptions(backends=["onnxruntim"], startup=False))
    with pytest.raises(UsageError, match="did you mean 'openvino'"):
        bench_command(BenchOptions(backends=["torch", "openvin"], startup=False))
    res = CliRunner().invoke(app, ["bench", "--backends", "onnxruntime", "--backbone", "sd15_shape"])
    assert res.exit_code == 2 and "did you mean 'sd15-shape'" in res.stderr
    res = CliRunner().invoke(app, ["bench", "--backends", "tensort", "--no-startup"])
    assert res.exit_code == 2 and "tensorrt" in res.output


def _bundle_copy(tmp_path: Path, source_ckpt: str) -> Path:
    """The demo bundle (files linked) with its manifest naming another source checkpoint."""
    copy = tmp_path / "bundle"
    copy.mkdir(parents=True)
    for item in BUNDLE_DIR.iterdir():
        if item.name not in ("manifest.json", ".verified.json"):
            (copy / item.name).symlink_to(item)
    manifest = json.loads((BUNDLE_DIR / "manifest.json").read_text())
    manifest["source_ckpt"]["path"] = source_ckpt
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_bundle_only_benches_torch_on_the_checkpoint_it_names(tmp_path: Path) -> None:
    sources = resolve_sources(["torch", "onnxruntime"], BUNDLE_DIR, None)
    assert sources.ckpt is not None and sources.ckpt.resolve() == CKPT_PATH.resolve() and not sources.skipped
    here = _bundle_copy(tmp_path / "a", str(CKPT_PATH))
    assert resolve_sources(["torch"], here, None).ckpt == CKPT_PATH
    gone = _bundle_copy(tmp_path / "b", str(tmp_path / "gone.pt"))
    sources = resolve_sources(["torch", "onnxruntime"], gone, None)
    assert sources.ckpt is None and "gone.pt" in sources.skipped["torch"] and "onnxruntime" not in sources.skipped
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the exported checkpoint")
    changed = _bundle_copy(tmp_path / "c", str(other))
    sources = resolve_sources(["torch"], changed, None)
    assert sources.ckpt is None and "changed" in sources.skipped["torch"]
    with pytest.raises(BadInputError, match=r"no backend could be benchmarked.*torch"):
        bench_command(BenchOptions(backends=["torch"], startup=False), bundle=gone)


TORCH_FREE = """
import json, sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # importing them now fails, as where they are not installed
from pathlib import Path
from noop_rt.jobs.bench import BenchOptions, bench_command
options = BenchOptions(backends=["torch", "onnxruntime"], baseline_noises=2, baseline_measured_pairs=1, runs=1,
                       warmup=1, startup=False)
report, _ = bench_command(options, images=Path(sys.argv[1]))
print(json.dumps({"backends": sorted(report["backends"]), "skipped": report["skipped"],
                  "gflop": report["unet_gflop_per_sample"], "torch": sys.modules.get("torch") is not None}))
"""


def test_bench_module_and_its_bundle_path_run_without_torch(two_images: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import sys, noop_rt.jobs.bench; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=REPO, check=True)
    assert probe.stdout.strip() == "False"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(TORCH_FREE), str(two_images)], capture_output=True,
                         text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["backends"] == ["onnxruntime"] and "torch" in out["skipped"]["torch"]
    # the bundle records its UNet's FLOP count from export: quoted without torch (~0.37 GFLOP, as torch counts it)
    assert 0.2 < out["gflop"] < 0.6 and out["torch"] is False


def test_startup_script_reports_runs_memory_breakdown_and_torch(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "benchmarks/startup.py", "--runs", "2", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "startup.json").read_text())
    s = record["startup"]
    assert s["runs"] == 2 and len(s["wall_s"]) == 2 and all(w > 0 for w in s["wall_s"])
    assert min(s["wall_s"]) <= s["median_s"] <= max(s["wall_s"])
    assert s["command"].endswith("classify noop_rt/demo/examples/seven.png --json")
    if sys.platform.startswith("linux"):
        assert s["peak_rss_mb"] > 10 and len(s["rss_mb"]) == 2
    assert set(s["breakdown_s"]) == {"import", "open", "first_image", "interpreter_and_exit"}
    assert all(v >= 0 for v in s["breakdown_s"].values())
    assert s["torch_importable"] is True  # this environment has the [train] extra
    assert s["torch_imported"] is False and s["backend"] != "torch"  # the demo bundle runs without torch
    line = startup_line(s)
    assert line.startswith("start-up (python -m noop_rt classify") and line.endswith("torch not imported")
    md = (tmp_path / "startup.md").read_text()
    assert "median of 2" in md and "torch imported by the process | no" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_startup_failure_is_one_line_error(tmp_path: Path) -> None:
    from noop_rt.jobs.startup import measure_startup

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadInputError, match=r"start-up run.*failed \(exit 1\)") as info:
        measure_startup(bad, runs=1)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_percentiles_and_extrapolated_stats() -> None:
    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _percentile([1.0, 2.0], 0.95) == 1.95
    s = stats([0.01, 0.02, 0.03], evals=100, gflop=1.0, scale=10)
    assert s["p50_ms"] == 200.0 and abs(s["images_per_s"] - 5.0) < 1e-9
    assert abs(s["achieved_tflops"] - 100 * 1.0 / 1e3 / 0.2) < 1e-9
    many = stats([0.001 * i for i in range(1, 21)], evals=1, gflop=None)
    assert many["p95_ms"] == pytest.approx(1e3 * _percentile([0.001 * i for i in range(1, 21)], 0.95))


def test_flop_rates_read_in_their_unit() -> None:
    from noop_rt.jobs.bench import flop_rate

    assert flop_rate(0.0236) == "23.6 GFLOP/s" and flop_rate(412.0) == "412 TFLOP/s"


def test_the_shape_fixture_names_match_the_models_built() -> None:
    """The CLI checks `--backbone` against the torch-free list; the build side holds one model per name."""
    from noop_rt.build import SHAPE_FIXTURES
    from noop_rt.build.shape_fixtures import REFERENCE_UNET_GFLOP, SHAPES

    assert set(SHAPES) == set(SHAPE_FIXTURES) and set(REFERENCE_UNET_GFLOP) <= set(SHAPES)


def test_bench_json_prints_the_report_on_stdout(two_images: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "--backends", "onnxruntime", "--runs", "1", "--baseline-noises", "1",
                                   "--images", str(two_images), "--no-startup", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["backends"]["onnxruntime"]["noop"]["unet_evals_per_image"] == DEMO_CLASSES
