"""The layering of pyproject.toml's import-linter contracts: it holds for the code, and it fails on a wrong import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the `noop_rt` package found first on the path under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_contracts_hold() -> None:
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in res.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("runtime/classifier.py", "from noop_rt.train import backbones", "no import runs back up a layer"),
    ("train/noop.py", "from noop_rt.build import export", "no import runs back up a layer"),
    ("jobs/batch.py", "from noop_rt.train import checkpoint", "only through the API"),
    ("runtime/bundle.py", "import torch", "imports no torch"),
])
def test_a_wrong_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """A copy of the package with one import added where the layering forbids it: `lint-imports` fails and names
    the contract and the module."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "noop_rt", tmp_path / "noop_rt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.bin", "*.pt", "*.safetensors", "*.png"))
    target = tmp_path / "noop_rt" / module
    text = target.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    target.write_text(head + sep + line + "\n" + rest)
    res = lint(tmp_path)
    assert res.returncode == 1, res.stdout[-3000:]
    broken = res.stdout.split("Broken contracts")[-1]
    assert contract in broken and "noop_rt." + module.removesuffix(".py").replace("/", ".") in broken, broken


def test_the_demo_data_imports_no_torch() -> None:
    """`import noop_rt.demo.domains` (Pillow and numpy) loads none of torch, diffusers, transformers."""
    code = ("import sys, noop_rt.demo.domains, noop_rt.demo.digits\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
