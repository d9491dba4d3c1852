"""`noop-rt batch`: inputs, error rows, resume after a crash, refusal of foreign outputs, Ray == in process."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from noop_rt.batch import BatchOptions, expand_inputs, parts_dir, read_rows, run_batch
from noop_rt.cli import app
from noop_rt.errors import BadInputError
from noop_rt.runtime.loader import Request

runner = CliRunner()
HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture()
def images(shape_images, tmp_path):
    """The shape images plus one corrupt file and one path that does not exist."""
    folder = tmp_path / "imgs"
    shutil.copytree(shape_images, folder)
    (folder / "red_square" / "broken.png").write_bytes(b"\x89PNG broken")
    return folder


def test_expand_inputs_folders_globs_and_lists(images, tmp_path) -> None:
    files = sorted(str(p) for p in images.rglob("*.png"))
    assert expand_inputs([str(images)]) == files
    assert expand_inputs([str(images / "red_square" / "*.png")]) == sorted(
        str(p) for p in (images / "red_square").glob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("# paths\n" + "\n".join(files[:2]) + "\n\n" + files[0] + "\n")
    assert expand_inputs([str(listing)]) == files[:2]
    pq.write_table(pa.table({"path": files[2:4]}), tmp_path / "list.parquet")
    assert expand_inputs([str(tmp_path / "list.parquet"), files[2]]) == files[2:4]
    assert expand_inputs([str(tmp_path / "missing.png")]) == [str(tmp_path / "missing.png")]
    with pytest.raises(BadInputError, match="no files match"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_bad_files_get_error_rows_and_rows_match_classify(tiny_bundle, images, tmp_path) -> None:
    out = tmp_path / "out.parquet"
    missing = str(tmp_path / "missing.png")
    req = Request(bundle=tiny_bundle)
    report = run_batch([str(images), missing], out, req, BatchOptions(batch_size=3), log=io.StringIO(),
                       show_progress=False)
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(rows) == len(set(paths)) == 8 and report.failed == 2 and report.classified == 6
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {str(images / "red_square" / "broken.png"), missing}
    assert "cannot read image" in errors[str(images / "red_square" / "broken.png")]
    assert "not found" in errors[missing]
    good = [r for r in rows if not r["error"]]
    res = runner.invoke(app, ["classify", *[r["path"] for r in good], "--bundle", str(tiny_bundle), "--json"])
    assert res.exit_code == 0, res.output
    for row, ref in zip(good, json.loads(res.stdout), strict=True):
        assert row["label"] == ref["top"][0]["class"]
        assert row["top_errors"] == pytest.approx([t["error"] for t in ref["top"]], abs=1e-5)
        assert row["backend"] == "onnxruntime" and row["method"] == "noop"
    assert not parts_dir(out).exists()


def test_crash_then_resume_yields_each_path_once(tiny_bundle, images, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    req = Request(bundle=tiny_bundle)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_batch([str(images)], out, req, BatchOptions(batch_size=2, fail_after_batches=2), log=io.StringIO(),
                  show_progress=False)
    assert not out.exists() and len(list(parts_dir(out).glob("part-*.jsonl"))) == 2
    log = io.StringIO()
    report = run_batch([str(images)], out, req, BatchOptions(batch_size=2), log=log, show_progress=False)
    assert report.skipped == 4 and "skipped 4" in log.getvalue()
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.rglob("*.png"))
    again = run_batch([str(images)], out, req, BatchOptions(batch_size=2), log=io.StringIO(), show_progress=False)
    assert again.skipped == 7 and again.classified == 0 and len(read_rows(out)) == 7


def test_output_of_another_model_is_refused(tiny_bundle, images, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    run_batch([str(images / "red_square")], out, Request(bundle=tiny_bundle), BatchOptions(), log=io.StringIO(),
              show_progress=False)
    res = runner.invoke(app, ["batch", str(images), "--out", str(out), "--bundle", str(tiny_bundle), "--classes",
                              "red,green"])
    assert res.exit_code == 1 and "another bundle, class list or method" in res.stderr
    res = runner.invoke(app, ["batch", str(images), "--out", str(tmp_path / "x.csv"), "--bundle", str(tiny_bundle)])
    assert res.exit_code == 1 and ".parquet or .jsonl" in res.stderr


def test_a_run_where_nothing_could_be_read_fails(tiny_bundle, tmp_path) -> None:
    out = tmp_path / "labels.jsonl"
    res = runner.invoke(app, ["batch", str(tmp_path / "no-such-folder"), "--out", str(out), "--bundle",
                              str(tiny_bundle)])
    assert res.exit_code == 1 and "none of the 1 new input(s) could be read" in res.stderr
    assert [r["error"] for r in read_rows(out)] == [f"image not found: {tmp_path / 'no-such-folder'}"]


@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'noop-rt[ray]'); CI installs it")
def test_ray_matches_in_process(tiny_bundle, images, tmp_path) -> None:
    req = Request(bundle=tiny_bundle)
    local = tmp_path / "local.parquet"
    run_batch([str(images)], local, req, BatchOptions(batch_size=3), log=io.StringIO(), show_progress=False)
    on_ray = tmp_path / "ray.parquet"
    report = run_batch([str(images)], on_ray, req, BatchOptions(batch_size=3, ray=True, workers=2),
                       log=io.StringIO(), show_progress=False)
    assert report.mode == "ray"
    a = {r["path"]: r for r in read_rows(local)}
    b = {r["path"]: r for r in read_rows(on_ray)}
    assert a.keys() == b.keys() and len(a) == 7
    for path, row in a.items():
        assert row["label"] == b[path]["label"] and bool(row["error"]) == bool(b[path]["error"])
        if not row["error"]:
            assert row["top_errors"] == pytest.approx(b[path]["top_errors"], abs=1e-5)
