"""The command line: JSON contract, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from noop_rt.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_classify_json_contract(tiny_sd, shape_images) -> None:
    img = next((shape_images / "red_square").iterdir())
    res = invoke("classify", img, "--model", tiny_sd, "--data", shape_images, "--method", "baseline",
                 "--noises", "3", "--top-k", "2", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out) == 1
    row = out[0]
    assert set(row) == {"image", "label", "prob", "top", "method", "backend", "latency_ms", "timings", "unet_evals",
                        "calibrated"}
    assert row["label"] == row["top"][0]["class"] and row["prob"] == row["top"][0]["prob"]
    assert set(row["timings"]) == {"preprocess", "model", "scoring"}
    assert row["latency_ms"] == pytest.approx(sum(row["timings"].values()), abs=1e-3)
    assert row["method"] == "baseline" and row["backend"] == "torch" and row["unet_evals"] == 3 * 2
    assert [t["class"] for t in row["top"]] and {t["class"] for t in row["top"]} == {"red square", "blue circle"}
    assert sum(t["prob"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)
    assert row["top"][0]["error"] <= row["top"][1]["error"]


@pytest.mark.parametrize("method", ["adaptive", "pruned"])
def test_classify_other_strategies(tiny_sd, shape_images, method: str) -> None:
    img = next((shape_images / "blue_circle").iterdir())
    res = invoke("classify", img, img, "--model", tiny_sd, "--classes", "red square,blue circle,green square",
                 "--method", method, "--noises", "10", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out) == 2 and all(r["method"] == method for r in out)
    if method == "adaptive":  # --noises 10 without --stages: 1 pair keeps 3 (all), then 9 more = 10 pairs x 3
        assert all(r["unet_evals"] == 30 for r in out)
    else:  # rounds of 5 pairs: the first scores all 3 classes, the next one only the survivors
        assert all(15 <= r["unet_evals"] <= 30 and r["unet_evals"] % 5 == 0 for r in out)


def test_human_output_and_speed_line(tiny_sd, shape_images) -> None:
    img = next((shape_images / "red_square").iterdir())
    res = invoke("classify", img, "--model", tiny_sd, "--classes", "red square,blue circle", "--method",
                 "baseline", "--noises", "2")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(str(img))
    assert "Speed:" in res.stderr and "noise+UNet" in res.stderr


def test_eval_reports_accuracy_confusion_and_protocol(tiny_sd, shape_images) -> None:
    res = invoke("eval", "--data", shape_images, "--model", tiny_sd, "--method", "baseline", "--noises", "2",
                 "--seed", "3", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    # accuracy is what the confusion matrix says: correct (diagonal) over all
    confusion = rep["confusion"]
    assert rep["n"] == 6 and sum(map(sum, confusion)) == 6 and len(confusion) == 2
    assert rep["accuracy"] == pytest.approx((confusion[0][0] + confusion[1][1]) / 6)
    assert rep["method"] == "baseline" and rep["backend"] == "torch"
    p = rep["protocol"]
    assert p["strategy"]["method"] == "baseline" and p["strategy"]["pairs"] == 2 and p["strategy"]["seed"] == 3
    assert p["strategy"]["timestep_grid"] == {"n": 2, "first": 250, "step": 500, "num_train_timesteps": 1000}
    assert p["loss"] == "l2" and p["images"] == 6 and p["classes"] == ["blue circle", "red square"]
    assert p["prompts"] == ["a photo of a blue circle", "a photo of a red square"]
    assert p["preprocessing"]["resolution"] == 32 and len(p["model"]["fingerprint"]) == 16


def test_adaptive_and_pruned_spend_fewer_unet_evals_than_baseline(tiny_sd, shape_images) -> None:
    """Through the CLI on 6 classes: baseline 20 pairs = 120 evals; adaptive 2:2,20:1 = 2*6 + 18*2 = 48 (stage 1
    scores the 2 pairs at slots 5 and 15 of the 20-grid for all 6 classes; stage 2 the other 18 for the 2 kept)."""
    img = next((shape_images / "red_square").iterdir())
    classes = "red square,blue circle,green square,red circle,blue square,green circle"

    def evals(*extra: str) -> int:
        res = invoke("classify", img, "--model", tiny_sd, "--classes", classes, "--json", *extra)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)[0]["unet_evals"]

    assert evals("--method", "baseline", "--noises", "20") == 120
    assert evals("--method", "adaptive", "--stages", "2:2,20:1") == 48
    # pruned on the trained demo, where the right digit separates clearly: classes are dropped before 20 pairs
    res = invoke("classify", "noop_rt/demo/examples/seven.png", "--method", "pruned", "--noises", "20", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)[0]
    assert out["top"][0]["class"] == "seven" and out["unet_evals"] < 20 * 10


def one_line_error(res, code: int, needle: str) -> None:
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_bad_inputs_exit_1_with_one_line(tiny_sd, shape_images, tmp_path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    one_line_error(invoke("classify", bad, "--model", tiny_sd, "--classes", "a,b", "--method", "baseline",
                          "--noises", "1"), 1, "cannot read image")
    one_line_error(invoke("classify", tmp_path / "missing.png", "--model", tiny_sd, "--classes", "a,b",
                          "--method", "baseline"), 1, "image not found")
    one_line_error(invoke("classify", shape_images, "--model", tiny_sd, "--classes", "a,b"), 1,
                   "is a folder, not an image")
    one_line_error(invoke("classify", bad, "--model", tmp_path, "--classes", "a,b"), 1, "model_index.json")
    one_line_error(invoke("classify", bad, "--model", tiny_sd, "--classes", " , "), 1, "class list is empty")
    one_line_error(invoke("classify", bad, "--model", tiny_sd), 1, "no classes given")
    one_line_error(invoke("eval", "--data", tmp_path / "nope", "--model", tiny_sd), 1, "data folder not found")
    one_line_error(invoke("classify", bad, "--bundle", tmp_path), 1, "manifest.json is missing")
    # a bad --stages value is a usage error (exit 2), like every other bad option value
    one_line_error(invoke("classify", bad, "--model", tiny_sd, "--classes", "a,b", "--method", "adaptive",
                          "--stages", "25:5,10:1"), 2, "increasing pair counts")
    one_line_error(invoke("classify", bad, "--method", "adaptive", "--stages", "5:x"), 2, "bad stage '5:x'")
    not_a_bundle = tmp_path / "README.md"
    not_a_bundle.write_text("# a file")
    one_line_error(invoke("classify", bad, "--bundle", not_a_bundle), 1, "is a file; a bundle is a folder")


def test_arguments_are_checked_before_the_model_is_opened(tmp_path) -> None:
    """A bad option value or a missing image is reported even when the model does not exist: nothing was opened."""
    nowhere = tmp_path / "no-such-model"
    one_line_error(invoke("classify", tmp_path / "x.png", "--model", nowhere, "--method", "baselin"), 2,
                   "did you mean 'baseline'")
    one_line_error(invoke("classify", tmp_path / "x.png", "--model", nowhere), 1, "image not found")


def test_unknown_values_suggest_the_close_match(tiny_sd, shape_images) -> None:
    img = next((shape_images / "red_square").iterdir())
    one_line_error(invoke("classify", img, "--model", tiny_sd, "--classes", "a,b", "--method", "baselin"), 2,
                   "did you mean 'baseline'")
    one_line_error(invoke("classify", img, "--model", tiny_sd, "--classes", "a,b", "--backend", "onnxrt"), 2,
                   "did you mean 'onnxruntime'")


def test_noop_without_a_learned_noise_is_refused(tiny_sd, shape_images) -> None:
    img = next((shape_images / "red_square").iterdir())
    one_line_error(invoke("classify", img, "--model", tiny_sd, "--classes", "a,b", "--method", "noop"), 2,
                   "needs a learned noise")


def test_li_et_al_prompt_files_give_each_class_its_prompt(tiny_sd, shape_images, tmp_path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt,classname,classidx\n"a photo of a red square, a shape.",red square,0\n'
                       '"a photo of a blue circle, a shape.",blue circle,1\n')
    res = invoke("eval", "--data", shape_images, "--model", tiny_sd, "--prompts", prompts, "--method", "baseline",
                 "--noises", "2", "--json")
    assert res.exit_code == 0, res.output
    p = json.loads(res.stdout)["protocol"]
    assert dict(zip(p["classes"], p["prompts"], strict=True)) == {"red square": "a photo of a red square, a shape.",
                                                                  "blue circle": "a photo of a blue circle, a shape."}


def test_help_has_plain_labels() -> None:
    for command in ("classify", "eval", "train", "batch", "export", "bench"):
        res = invoke(command, "--help")
        assert res.exit_code == 0
        labels = re.findall(r"<(?:int|float|bool|text|list|path)[^>]*>", res.stdout, flags=re.IGNORECASE)
        assert labels == [], labels  # no <int range>, <bool>, <list[Path]>
        assert re.findall(r"\{[A-Z]+", res.stdout) == []  # no {IMAGE}... usage decoration


def test_batch_ray_takes_an_optional_address() -> None:
    from noop_rt.cli import ray_address_argv

    argv = ["batch", "imgs", "--ray", "ray://head:10001", "--out", "x.parquet"]
    assert ray_address_argv(argv) == ["batch", "imgs", "--ray", "--ray-address", "ray://head:10001", "--out",
                                      "x.parquet"]
    assert ray_address_argv(["batch", "--ray", "10.0.0.1:6379", "a.png"])[1:4] == ["--ray", "--ray-address",
                                                                                    "10.0.0.1:6379"]
    assert ray_address_argv(["batch", "--ray", "imgs/", "--out", "o.jsonl"]) == ["batch", "--ray", "imgs/", "--out",
                                                                                 "o.jsonl"]
    assert ray_address_argv(["classify", "--ray", "auto"]) == ["classify", "--ray", "auto"]


def test_usage_errors_from_the_console_script_are_one_line() -> None:
    import subprocess
    import sys

    for args, needle in ((["classify"], "Missing argument"), (["classify", "x.png", "--top-k", "0"], "--top-k"),
                         (["bogus"], "No such command")):
        res = subprocess.run([sys.executable, "-m", "noop_rt", *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_a_raw_pickle_checkpoint_is_one_line_without_torch_warnings(tmp_path) -> None:
    import pickle
    import subprocess
    import sys

    bad = tmp_path / "raw.pt"
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    res = subprocess.run([sys.executable, "-m", "noop_rt", "classify", "noop_rt/demo/examples/seven.png", "--ckpt",
                          str(bad)], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "not a readable noop-rt checkpoint" in lines[0]


def test_long_classify_runs_show_a_progress_bar(tmp_path) -> None:
    from noop_rt.demo import EXAMPLES_DIR

    images = sorted(EXAMPLES_DIR.glob("*.png")) * 4  # 40 images
    res = invoke("classify", *images, "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 40
    assert "classify" in res.stderr and "40/40" in res.stderr  # tqdm's bar on stderr, never on stdout
    short = invoke("classify", images[0])
    assert "it/s" not in short.stderr and "img/s" not in short.stderr


def test_train_takes_li_et_al_prompt_files(tiny_sd, shape_images, tmp_path) -> None:
    from noop_rt.train.checkpoint import load_checkpoint

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,classname,classidx\n\"a red square, a shape\",red square,0\n"
                       "\"a blue circle, a shape\",blue circle,1\n")
    out = tmp_path / "p.pt"
    res = invoke("train", "--model", tiny_sd, "--data", shape_images, "--shots", "2", "--val-shots", "1", "--epochs",
                 "1", "--batch-size", "2", "--prompts", prompts, "--out", out)
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out)
    assert dict(zip(ckpt.classes, ckpt.prompts, strict=True)) == {"red square": "a red square, a shape",
                                                                   "blue circle": "a blue circle, a shape"}


@pytest.mark.parametrize("args", [
    ["train", "--data", "DATA", "--out", "OUT/x.pt"],
    ["export", "--ckpt", "CKPT", "--out", "OUT/bundle"],
    ["batch", "DATA", "--out", "OUT/labels.jsonl"],
    ["bench", "--backends", "onnxruntime", "--no-startup", "--out", "OUT/bench.json"],
])
def test_an_output_that_cannot_be_written_fails_before_any_work(args, tmp_path) -> None:
    """The output's folder is under a regular file: refused in one line, exit 1, before a model is opened."""
    import time

    from noop_rt.demo import CKPT_PATH, EXAMPLES_DIR

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    subs = {"DATA": str(EXAMPLES_DIR), "CKPT": str(CKPT_PATH), "OUT": str(blocker)}
    argv = [a.replace("OUT", subs["OUT"]) if a.startswith("OUT") else subs.get(a, a) for a in args]
    start = time.perf_counter()
    res = CliRunner().invoke(app, argv)
    assert time.perf_counter() - start < 2  # the check, not training or loading
    assert res.exit_code == 1, res.output
    assert res.stderr.count("\n") == 1 and "a-file" in res.stderr and "not a folder" in res.stderr, res.stderr


def test_version() -> None:
    from noop_rt import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"noop-rt {__version__}"


def test_what_a_label_should_be_read_with_is_said(tmp_path) -> None:
    """A blank image and an animated one are classified, with a warning each in --json and on stderr; an image
    over the pixel limit is one line, and Pillow's own bomb warning never reaches the user."""
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (1, 1), (255, 255, 255)).save(blank)
    gif = tmp_path / "moving.gif"
    frames = [Image.new("L", (16, 16), v) for v in (0, 128, 255)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    res = runner.invoke(app, ["classify", str(blank), str(gif), "--json"])
    assert res.exit_code == 0, res.output
    answers = {Path(a["image"]).name: a for a in json.loads(res.stdout)}
    assert "blank image" in answers["blank.png"]["warnings"][0]
    assert "3 frames: the first is classified" in answers["moving.gif"]["warnings"][0]
    assert f"warning: {blank}: a blank image" in res.stderr
    huge = tmp_path / "huge.png"
    Image.new("1", (9500, 9500)).save(huge)  # 90 M pixels: over the 89 M limit, a few kB on disk
    import subprocess
    import sys

    # a fresh process: pytest would capture a Python warning before it reached stderr
    res = subprocess.run([sys.executable, "-m", "noop_rt", "classify", str(huge)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "pixel limit" in res.stderr, res.stderr


def test_a_named_adaptive_setting_brings_its_loss(capsys) -> None:
    """`--stages pets` is Li et al.'s whole setting: its schedule and their l1 loss, said on stderr; --loss wins."""
    from noop_rt.cli.options import load_request

    request = load_request(method="adaptive", stages="pets")
    assert request.strategy["stages"] == ((25, 5), (250, 1)) and request.strategy["loss"] == "l1"
    assert "stages 25:5,250:1, loss l1" in capsys.readouterr().err
    assert load_request(method="adaptive", stages="pets", loss="l2").strategy["loss"] == "l2"
    assert "loss" not in load_request(method="adaptive", stages="25:5,250:1").strategy


@pytest.mark.parametrize(("blocked", "args", "says"), [
    ("sklearn", ["demo-data", "OUT/digits"], "scikit-learn"),
    ("matplotlib", ["bench", "--backends", "onnxruntime", "--no-startup", "--plot", "OUT/bench.png"], "matplotlib"),
])
def test_a_missing_optional_package_is_named_before_any_work(blocked, args, says, tmp_path) -> None:
    """In a process where the package cannot be imported: one line naming it and how to install it, exit 1."""
    import subprocess
    import sys

    argv = [a.replace("OUT", str(tmp_path)) for a in args]
    code = (f"import sys\nsys.modules[{blocked!r}] = None\nsys.argv = ['noop-rt', *{argv!r}]\n"
            "from noop_rt.cli import run\nrun()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and says in lines[0] and "pip install" in lines[0], res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_export_names_a_bundle_folder_given_as_the_checkpoint() -> None:
    from noop_rt.demo import BUNDLE_DIR

    res = runner.invoke(app, ["export", "--ckpt", str(BUNDLE_DIR)])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert "an exported bundle" in res.stderr and "NAME.pt" in res.stderr
