"""The benchmark is not a test of speed: one smoke run with tiny settings checks its report and files."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from noop_rt.bench import _percentile, stats
from noop_rt.cli import app


def test_bench_smoke_writes_the_report_schema(tiny_bundle, tmp_path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = CliRunner().invoke(app, ["bench", "--bundle", str(tiny_bundle), "--runs", "2", "--baseline-noises", "6",
                                   "--measured-pairs", "2", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["classes"] == 2 and {"cpu", "torch", "onnxruntime"} <= set(report["machine"])
    assert set(report["backends"]) == {"torch", "onnxruntime"}
    for b in report["backends"].values():
        assert {"p50_ms", "p95_ms", "images_per_s", "unet_evals_per_image"} <= set(b["noop"])
        assert b["noop"]["unet_evals_per_image"] == 2 and b["baseline"]["unet_evals_per_image"] == 6 * 2
        assert b["baseline"]["extrapolated"] is True and b["speedup_vs_baseline"] > 0
    assert set(report["speedup_vs_torch"]) == {"torch", "onnxruntime"} and report["unet_gflop_per_sample"] > 0
    assert png.stat().st_size > 1000
    assert "speed-up" in res.stdout


def test_percentiles_and_extrapolated_stats() -> None:
    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _percentile([1.0, 2.0], 0.95) == 1.95
    s = stats([0.01, 0.02, 0.03], evals=100, gflop=1.0, scale=10)
    assert s["p50_ms"] == 200.0 and abs(s["images_per_s"] - 5.0) < 1e-9
    assert abs(s["achieved_tflops"] - 100 * 1.0 / 1e3 / 0.2) < 1e-9
