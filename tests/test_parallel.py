"""Classification calls in flight at once (jobs/parallel.py): the engine plan per engine, results in input order
whatever order the calls finish in, and `batch` / `eval` giving the same rows as one call at a time, with the plan
recorded in their --json outputs."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from noop_rt.api import LoadOptions
from noop_rt.cli import app
from noop_rt.demo import EXAMPLES_DIR
from noop_rt.jobs.batch import BatchOptions, read_rows, run_batch
from noop_rt.jobs.parallel import EnginePlan, ordered, plan
from noop_rt.runtime.errors import BadInputError

runner = CliRunner()
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture()
def many(tmp_path: Path) -> Path:
    """40 copies of the demo examples (their names keep the true class: `seven-3.png` is a seven)."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(4):
        for src in EXAMPLES:
            shutil.copy(src, folder / f"{src.stem}-{i}.png")
    return folder


def test_the_plan_per_engine_and_the_overrides() -> None:
    assert plan("onnxruntime", "CPUExecutionProvider", ncores=2) == EnginePlan(
        2, 1, 1, "measured default for onnxruntime on 2 core(s)")
    vino = plan("openvino", "CPU", ncores=4)
    assert (vino.concurrency, vino.threads, vino.sessions) == (4, 1, 4)  # one inference request per call
    assert (plan("onnxruntime", "cuda:0", ncores=8).concurrency, plan("tensorrt", "cuda:0").sessions) == (1, 1)
    mine = plan("onnxruntime", "CPUExecutionProvider", threads=2, concurrency=3, ncores=2)
    assert (mine.concurrency, mine.threads, mine.sessions) == (3, 2, 1) and "--threads and --concurrency" in mine.why
    assert plan("onnxruntime", "CPUExecutionProvider", concurrency=1, ncores=4).threads is None  # the engine's own
    assert plan("onnxruntime", "CPUExecutionProvider", concurrency=2, ncores=4).threads == 2  # the cores, split
    with pytest.raises(BadInputError, match="--concurrency"):
        plan("onnxruntime", "CPUExecutionProvider", concurrency=0)


def test_ordered_gives_input_order_with_at_most_k_calls_in_distinct_slots() -> None:
    running: set[int] = set()
    peak = [0]
    lock = threading.Lock()

    def infer(slot: int, item: int) -> tuple[int, int]:
        with lock:
            assert slot not in running, "two calls in one slot"
            running.add(slot)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.02 * (item % 3 == 0))  # every third item finishes after the ones behind it
        with lock:
            running.discard(slot)
        return item, slot

    out = list(ordered(range(30), lambda x: x * 10, infer, concurrency=3))
    assert [item for item, _ in out] == [x * 10 for x in range(30)]
    assert peak[0] == 3 and {slot for _, slot in out} == {0, 1, 2}


def test_ordered_stops_at_an_error_and_runs_nothing_after() -> None:
    seen: list[int] = []

    def infer(slot: int, item: int) -> int:
        seen.append(item)
        if item == 2:
            raise ValueError("bad item")
        return item

    results = ordered(range(100), lambda x: x, infer, concurrency=2)
    with pytest.raises(ValueError, match="bad item"):
        list(results)
    assert len(seen) < 10  # only what was in flight (2 x concurrency ahead), not the 100


def rows_by_path(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in read_rows(path)}


def assert_same_rows(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for path, row in a.items():
        ref = b[path]
        assert (row["label"], row["top_classes"], row["error"]) == (ref["label"], ref["top_classes"], ref["error"])
        assert row["top_errors"] == pytest.approx(ref["top_errors"], abs=1e-5)


def test_batch_in_flight_gives_the_rows_of_one_call_at_a_time_in_input_order(many: Path, tmp_path: Path) -> None:
    one = tmp_path / "one.parquet"
    report_one = run_batch([str(many)], one, LoadOptions(), BatchOptions(batch_size=3, concurrency=1, threads=2),
                           log=io.StringIO(), show_progress=False)
    three = tmp_path / "three.jsonl"
    report = run_batch([str(many)], three, LoadOptions(), BatchOptions(batch_size=3, concurrency=3, threads=1),
                       log=io.StringIO(), show_progress=False)
    assert report_one.engine["concurrency"] == 1 and report.engine["concurrency"] == 3
    assert report.engine["steady_images_per_s"] > 0 and report.engine["first_rows_s"] > 0
    rows = read_rows(three)
    assert [r["path"] for r in rows] == sorted(str(p) for p in many.glob("*.png"))
    assert {r["path"]: r["label"] for r in rows} == {r["path"]: Path(r["path"]).stem.split("-")[0] for r in rows}
    assert_same_rows(rows_by_path(three), rows_by_path(one))


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino is not installed (pip install 'noop-rt[openvino]')")
def test_openvino_runs_calls_in_flight_on_classifiers_of_their_own(many: Path, tmp_path: Path) -> None:
    """One OpenVINO inference request serves one call at a time ('Infer Request is busy' when shared)."""
    ort = tmp_path / "ort.parquet"
    run_batch([str(many)], ort, LoadOptions(backend="onnxruntime"), BatchOptions(batch_size=2, concurrency=1),
              log=io.StringIO(), show_progress=False)
    vino = tmp_path / "vino.parquet"
    report = run_batch([str(many)], vino, LoadOptions(backend="openvino"), BatchOptions(batch_size=2, concurrency=2),
                       log=io.StringIO(), show_progress=False)
    assert (report.engine["concurrency"], report.engine["sessions"]) == (2, 2) and report.failed == 0
    a, b = rows_by_path(vino), rows_by_path(ort)
    assert a.keys() == b.keys()
    assert sum(a[p]["label"] == b[p]["label"] for p in a) == len(a)


def test_batch_and_eval_json_record_the_plan(many: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    res = runner.invoke(app, ["batch", str(many), "--out", str(out), "--concurrency", "2", "--threads", "1",
                              "--json"])
    assert res.exit_code == 0, res.output
    engine = json.loads(res.stdout)["engine"]
    assert (engine["concurrency"], engine["threads"]) == (2, 1) and engine["why"].startswith("--threads")
    data = tmp_path / "data"
    for src in EXAMPLES:
        (data / src.stem).mkdir(parents=True)
        for i in range(2):
            shutil.copy(src, data / src.stem / f"{i}.png")
    one = runner.invoke(app, ["eval", "--data", str(data), "--concurrency", "1", "--json"])
    two = runner.invoke(app, ["eval", "--data", str(data), "--json"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["engine"]["concurrency"] == 1 and b["engine"]["why"].startswith("measured default")
    assert a["confusion"] == b["confusion"] and a["accuracy"] >= 0.9


def test_ray_steady_state_counts_only_the_calls_after_every_actor_warmed_up() -> None:
    from noop_rt.jobs.batch import steady_rate

    # actor 1: blocks [0, 10] (warm-up, 8 images), [10, 12], [12, 14]; actor 2: [0, 11] (warm-up), [11, 13]
    rows = [(1, 0.0, 10.0, 8), (1, 10.0, 12.0, 8), (1, 12.0, 14.0, 8), (2, 0.0, 11.0, 8), (2, 11.0, 13.0, 8)]
    # both warm at t = 11: the calls starting then or later hold 8 + 8 images, ending at 14
    assert steady_rate(rows) == pytest.approx(16 / 3)
    assert steady_rate([(1, 0.0, 5.0, 4)]) is None and steady_rate([]) is None
