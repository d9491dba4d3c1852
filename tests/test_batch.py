"""`noop-rt batch` on the shipped demo bundle: labels against the file names, error rows, resume after a crash or
Ctrl-C, atomic output, refusal of foreign outputs, Ray Data, and no torch import for a bundle.

The demo examples are one held-out image per class, named after it (`seven.png` is a seven): that is the truth."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from noop_rt.api import LoadOptions
from noop_rt.cli import app
from noop_rt.demo import BUNDLE_DIR, EXAMPLES_DIR
from noop_rt.jobs.batch import BatchOptions, expand_inputs, parts_dir, read_rows, run_batch
from noop_rt.runtime.classifier import Classifier
from noop_rt.runtime.errors import BadInputError

runner = CliRunner()
HAVE_RAY = importlib.util.find_spec("ray") is not None
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
DEMO = LoadOptions()  # noop_rt.load() with no source: the shipped demo bundle
COLUMNS = ["path", "label", "prob", "top_classes", "top_probs", "top_errors", "method", "backend", "unet_evals",
           "escalated", "model_id", "error"]


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """The ten demo examples in two sub-folders, plus one corrupt PNG."""
    folder = tmp_path / "imgs"
    for i, src in enumerate(EXAMPLES):
        dst = folder / ("a" if i % 2 else "b") / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    return folder


def good_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")


def assert_labels_are_the_file_names(rows: list[dict]) -> None:
    good = [r for r in rows if not r["error"]]
    assert good, "no classified rows"
    assert {r["path"]: r["label"] for r in good} == {r["path"]: Path(r["path"]).stem for r in good}


def test_expand_inputs_folders_globs_and_lists(images: Path, tmp_path: Path) -> None:
    files = sorted(str(p) for p in images.rglob("*.png"))
    assert len(files) == 11 and expand_inputs([str(images)]) == files
    assert expand_inputs([str(images / "a" / "*.png")]) == sorted(str(p) for p in (images / "a").glob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("# paths\n" + "\n".join(files[:2]) + "\n\n" + files[0] + "\n")
    assert expand_inputs([str(listing)]) == files[:2]
    pq.write_table(pa.table({"path": files[2:4]}), tmp_path / "list.parquet")
    assert expand_inputs([str(tmp_path / "list.parquet"), files[2]]) == files[2:4]
    assert expand_inputs([str(tmp_path / "missing.png")]) == [str(tmp_path / "missing.png")]
    with pytest.raises(BadInputError, match="no files match"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_labels_match_the_file_names_and_bad_files_get_error_rows(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    missing = str(tmp_path / "missing.png")
    report = run_batch([str(images), missing], out, DEMO, BatchOptions(batch_size=3, top_k=3), log=io.StringIO(),
                       show_progress=False)
    assert pq.read_table(out).schema.names == COLUMNS
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted([*map(str, images.rglob("*.png")), missing]) and len(set(paths)) == 12
    assert (report.total, report.classified, report.failed, report.skipped) == (12, 10, 2, 0)
    assert report.backend == "onnxruntime" and report.mode == "in-process"
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {str(images / "a" / "broken.png"), missing}
    assert "cannot read image" in errors[str(images / "a" / "broken.png")]
    assert "not found" in errors[missing]
    for row in rows:
        if row["error"]:
            assert row["label"] is None and row["top_classes"] is None and row["unet_evals"] == 0
    assert_labels_are_the_file_names(rows)
    good = [r for r in rows if not r["error"]]
    for row in good:
        assert len(row["top_classes"]) == 3 and row["top_classes"][0] == row["label"]
        assert row["prob"] == row["top_probs"][0] and row["top_probs"] == sorted(row["top_probs"], reverse=True)
        assert 0.5 < row["prob"] <= 1.0  # ten classes: a confident, correct answer on held-out digits
        assert row["method"] == "noop" and row["unet_evals"] == 10  # NoOp: one UNet pass per class
    assert len({r["model_id"] for r in rows}) == 1
    assert not parts_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out.parquet"]


def test_crash_then_resume_yields_each_path_once(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    log = io.StringIO()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_batch([str(images)], out, DEMO, BatchOptions(batch_size=3, fail_after_batches=2), log=log,
                  show_progress=False)
    parts = parts_dir(out)
    assert not out.exists() and len(list(parts.glob("part-*.jsonl"))) == 2
    assert f"stopped: kept 6 row(s) (6 in the unfinished part files {parts}" in log.getvalue()
    log = io.StringIO()
    report = run_batch([str(images)], out, DEMO, BatchOptions(batch_size=3), log=log, show_progress=False)
    message = log.getvalue()
    assert report.skipped == 6 and report.classified + report.failed == 5
    # the output did not exist yet: the message names the part files that hold the rows, not OUT
    assert "resuming: skipped 6 path(s)" in message and str(parts) in message and f"in {out}" not in message
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.rglob("*.png"))
    assert_labels_are_the_file_names(rows)
    assert not parts.exists()
    log = io.StringIO()
    again = run_batch([str(images)], out, DEMO, BatchOptions(batch_size=3), log=log, show_progress=False)
    assert again.skipped == 11 and again.classified == 0 and len(read_rows(out)) == 11
    assert f"skipped 11 path(s) already done (11 in {out})" in log.getvalue()


def test_output_is_replaced_atomically_and_new_inputs_resume(images: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out.jsonl"
    first = [str(p) for p in good_paths(images)[:4]]
    run_batch(first, out, DEMO, BatchOptions(batch_size=2), log=io.StringIO(), show_progress=False)
    before = out.read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):  # the disk fills up just as the merged output would replace the old one
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        run_batch([str(images)], out, DEMO, BatchOptions(batch_size=4), log=io.StringIO(), show_progress=False)
    assert out.read_bytes() == before  # the old output is whole, never half-written
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(read_parts_rows(out)) == 7  # the new rows wait in the part files
    monkeypatch.setattr(os, "replace", real_replace)
    log = io.StringIO()
    report = run_batch([str(images)], out, DEMO, BatchOptions(batch_size=4), log=log, show_progress=False)
    assert report.skipped == 11 and report.classified == 0
    assert f"4 in {out}" in log.getvalue() and "7 in the unfinished part files" in log.getvalue()
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.rglob("*.png"))
    assert_labels_are_the_file_names(rows)


def read_parts_rows(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(parts_dir(out).glob("part-*.jsonl"))
            for line in part.read_text().splitlines() if line.strip()]


def test_ctrl_c_keeps_the_rows_done_says_so_and_resumes(images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from noop_rt.cli import run

    out = tmp_path / "labels.jsonl"
    real_classify = Classifier.classify
    calls = {"n": 0}

    def classify_then_ctrl_c(self, *args, **kwargs):  # the user presses Ctrl-C during the second batch
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_classify(self, *args, **kwargs)

    monkeypatch.setattr(Classifier, "classify", classify_then_ctrl_c)
    argv = ["noop-rt", "batch", str(images / "b"), "--out", str(out), "--batch-size", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    parts = parts_dir(out)
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert lines == [f"interrupted: kept 2 row(s) (2 in the unfinished part files {parts}{os.sep}); re-run the "
                     "same command to resume"]
    assert "Traceback" not in err  # typer turns Ctrl-C into exit 130 with nothing printed: this line is the news
    assert "error: aborted" not in err  # the job's own line says it all
    assert not out.exists() and len(read_parts_rows(out)) == 2
    with pytest.raises(SystemExit) as exit_info:
        run()  # the same command again
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "resuming: skipped 2 path(s)" in captured.err and f"wrote {out}: 5 paths" in captured.out
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (images / "b").glob("*.png"))
    assert_labels_are_the_file_names(rows)


def test_output_of_another_model_is_refused(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run_batch([str(images / "b")], out, DEMO, BatchOptions(), log=io.StringIO(), show_progress=False)
    before = out.read_bytes()
    for other in (["--classes", "zero,one"], ["--method", "baseline", "--noises", "2"]):
        res = runner.invoke(app, ["batch", str(images), "--out", str(out), *other])
        assert res.exit_code == 1 and "another bundle, class list or method" in res.stderr, res.output
    assert out.read_bytes() == before
    res = runner.invoke(app, ["batch", str(images), "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 1 and ".parquet or .jsonl" in res.stderr


def test_a_run_where_nothing_could_be_read_fails(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    res = runner.invoke(app, ["batch", str(tmp_path / "no-such-folder"), "--out", str(out)])
    assert res.exit_code == 1 and "none of the 1 new input(s) could be read" in res.stderr
    assert [r["error"] for r in read_rows(out)] == [f"image not found: {tmp_path / 'no-such-folder'}"]


def test_a_bundle_batch_never_imports_torch(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import json, sys
        BLOCKED = ("torch", "diffusers", "transformers")
        for name in BLOCKED:
            sys.modules[name] = None  # `import torch` now fails
        from pathlib import Path
        from noop_rt.jobs.batch import BatchOptions, run_batch
        from noop_rt.api import LoadOptions
        load = LoadOptions.of({str(BUNDLE_DIR)!r}, device="cpu", max_batch=256, seed=0)
        report = run_batch([{str(images)!r}], Path({str(out)!r}), load, BatchOptions(batch_size=4),
                           show_progress=False)
        loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
        print(json.dumps({{"classified": report.classified, "failed": report.failed, "loaded": loaded}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"classified": 10, "failed": 1, "loaded": []}
    rows = read_rows(out)
    assert len(rows) == 11 and sum(1 for r in rows if r["error"]) == 1
    assert_labels_are_the_file_names(rows)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'noop-rt[ray]'); CI installs it")
def test_ray_gives_every_path_once_with_the_in_process_answers(images: Path, tmp_path: Path) -> None:
    import ray

    local = tmp_path / "local.parquet"
    run_batch([str(images)], local, DEMO, BatchOptions(batch_size=3), log=io.StringIO(), show_progress=False)
    on_ray = tmp_path / "ray.parquet"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_batch([str(images)], on_ray, DEMO, BatchOptions(batch_size=3, ray=True, workers=1),
                           log=io.StringIO(), show_progress=False)
    finally:
        ray.shutdown()
    assert report.mode == "ray" and report.backend == "onnxruntime"
    assert (report.total, report.classified, report.failed) == (11, 10, 1)
    rows = read_rows(on_ray)
    assert [r["path"] for r in rows] == sorted(str(p) for p in images.rglob("*.png"))  # input order, each once
    assert_labels_are_the_file_names(rows)
    a = {r["path"]: r for r in read_rows(local)}
    for row in rows:
        ref = a[row["path"]]
        assert bool(row["error"]) == bool(ref["error"]) and row["model_id"] == ref["model_id"]
        if not row["error"]:
            assert row["top_errors"] == pytest.approx(ref["top_errors"], abs=1e-5)
