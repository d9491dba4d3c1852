"""The README's five-minute tour, run as written but shrunk: a few shots and one epoch instead of the full split, so
that it proves the commands work in this order, not the accuracy (benchmarks/results/ holds that). `serve` is the one
line not run here: it needs Ray Serve and is exercised end to end by tests/test_serve.py."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHRINK = {"demo-data": ["--shots", "2", "--val-shots", "2"],
          "train": ["--shots", "2", "--val-shots", "2", "--epochs", "1"]}  # the last value of an option wins


def tour_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- tour.*?-->\s*```bash\n(.*?)```\s*<!-- /tour -->", text, re.S)
    assert block is not None, "the README lost its tour block"
    commands = []
    for line in block.group(1).splitlines():
        code = line.split("  #")[0].strip()
        if code:
            commands.append(shlex.split(code))
    return commands


@pytest.mark.slow
def test_the_readme_tour_runs_in_order(tmp_path: Path) -> None:
    (tmp_path / "noop_rt").symlink_to(ROOT / "noop_rt")  # the tour's example image paths are relative to a clone
    commands = tour_commands()
    assert [c[1] for c in commands] == ["demo", "demo-data", "train", "export", "eval", "classify", "batch", "serve"]
    outputs = {}
    for argv in commands:
        command = argv[1]
        if command == "serve":
            continue
        assert argv[0] == "noop-rt"
        res = subprocess.run([sys.executable, "-m", "noop_rt", *argv[1:], *SHRINK.get(command, [])], cwd=tmp_path,
                             capture_output=True, encoding="utf-8", timeout=600)  # not the locale's: a test
        # before may have left the process in the C locale
        assert res.returncode == 0, f"{shlex.join(argv)}:\n{res.stderr[-2000:]}"
        outputs[command] = res.stdout
    assert "10/10 correct" in outputs["demo"]
    assert (tmp_path / "digits.pt").is_file() and (tmp_path / "export" / "digits" / "manifest.json").is_file()
    assert outputs["eval"].startswith("accuracy ")
    answer = json.loads(outputs["classify"])[0]
    assert answer["image"].endswith("four.png") and len(answer["top"]) == 5
    assert (tmp_path / "labels.parquet").is_file() and "360 paths" in outputs["batch"]
