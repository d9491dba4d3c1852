"""`noop-rt batch --ray` when things die: a worker node killed in the middle of a job on Ray's multi-node test
cluster (`ray.cluster_utils.Cluster`, several raylets on one machine), and the driver killed (SIGKILL) then run
again. Each path must be in the output exactly once, with the in-process row, and the output must equal an
undisturbed run's. The drill itself is benchmarks/node_loss.py (its figures also go in batch_scaling.md).

Bounded: one cluster (a head and three one-CPU worker nodes), 240 images; a few minutes at most on 2 cores."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noop_rt.api import LoadOptions
from noop_rt.jobs.batch import BatchOptions, parts_dir, read_rows, run_batch

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("psutil") is not None
ROOT = Path(__file__).resolve().parents[1]
LOAD = LoadOptions(backend="onnxruntime")
IMAGES = 240
CLI = "from noop_rt.cli import run; run()"  # `noop-rt ...` with this interpreter (argv[1:] are the arguments)


def node_loss_module():
    spec = importlib.util.spec_from_file_location("node_loss", ROOT / "benchmarks" / "node_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_driver_after_parts(cmd: list[str], out: Path, parts: int, timeout: float = 120) -> int:
    """Start `cmd`, SIGKILL it once `parts` part files of `out` exist; the part files there then."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = parts_dir(out)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if folder.is_dir() and len(list(folder.glob("part-*.jsonl"))) >= parts:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the driver was not killed mid-job (exit {proc.returncode})"
    return len(list(folder.glob("part-*.jsonl")))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="ray/psutil not installed (pip install 'noop-rt[dev]'); CI installs them")
def test_a_lost_worker_node_and_a_killed_driver_lose_no_row(tmp_path: Path) -> None:
    drill = node_loss_module()
    listing, paths = drill.demo_inputs(tmp_path, IMAGES)
    ref_out = tmp_path / "in-process.parquet"
    run_batch([str(listing)], ref_out, LOAD, BatchOptions(), log=io.StringIO(), show_progress=False)
    reference = {r["path"]: r for r in read_rows(ref_out)}
    assert len(reference) == IMAGES and not any(r["error"] for r in reference.values())
    options = BatchOptions(ray=True, workers=2, ray_block_size=8)
    cluster = drill.start_cluster(3)
    try:
        result = drill.drill(cluster, listing, paths, tmp_path, LOAD, options, after=2, reference=reference)
        assert result["killed"] is not None, "no worker node hosted an actor mid-job: nothing was killed"
        assert result["killed"]["rows_back"] < IMAGES  # killed mid-job, not after
        assert result["finished"] and result["rows"] == IMAGES
        assert (result["missing"], result["duplicated"]) == (0, 0)
        assert result["rows_received_from_ray"] == IMAGES  # Ray delivered no row twice (the merge would hide it)
        assert result["different_from_in_process"] == 0 and result["different_from_undisturbed"] == 0
        assert result["same_order_and_columns_as_undisturbed"]

        # the driver killed mid-job (the cluster stays), then the same command again: it resumes
        out = tmp_path / "driver-killed.parquet"
        cmd = [sys.executable, "-c", CLI, "batch", str(listing), "--out", str(out), "--ray-address",
               cluster.address, "--workers", "2", "--ray-block-size", "8", "--backend", "onnxruntime"]
        kept = kill_driver_after_parts(cmd, out, parts=3)
        assert kept > 0 and not out.exists()
        log = io.StringIO()
        report = run_batch([str(listing)], out, LOAD, BatchOptions(ray=True, workers=2, ray_block_size=8), log=log,
                           show_progress=False)
    finally:
        drill.stop_cluster(cluster)
    assert report.skipped >= 8 * kept and "resuming" in log.getvalue()
    rows = read_rows(out)
    assert [r["path"] for r in rows] == paths  # input order, each once
    assert drill.same_rows(rows, reference) == 0


@pytest.mark.slow
def test_a_killed_in_process_driver_resumes_each_path_once(tmp_path: Path) -> None:
    drill = node_loss_module()
    listing, paths = drill.demo_inputs(tmp_path, 120)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-c", CLI, "batch", str(listing), "--out", str(out), "--batch-size", "2",
           "--backend", "onnxruntime"]
    kept = kill_driver_after_parts(cmd, out, parts=2)
    assert 0 < kept < 60 and not out.exists()
    log = io.StringIO()
    report = run_batch([str(listing)], out, LOAD, BatchOptions(batch_size=2), log=log, show_progress=False)
    assert report.skipped >= 2 * kept and report.classified == 120 - report.skipped
    rows = read_rows(out)
    assert [r["path"] for r in rows] == paths
    ref = tmp_path / "ref.jsonl"
    run_batch([str(listing)], ref, LOAD, BatchOptions(batch_size=2), log=io.StringIO(), show_progress=False)
    assert drill.same_rows(rows, {r["path"]: r for r in read_rows(ref)}) == 0
