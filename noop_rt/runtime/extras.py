"""Optional pieces: the install hint that fits how noop-rt was installed, and the one check that the torch side
(train, export, the torch backend, robust mode) is here. Nothing is imported to answer."""

from __future__ import annotations

import os
from pathlib import Path

from noop_rt.runtime.backends.base import installed
from noop_rt.runtime.errors import MissingDependencyError

TORCH_SIDE = ("torch", "diffusers", "transformers")


def source_checkout() -> Path | None:
    """The clone noop-rt runs from (an editable install or PYTHONPATH), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "noop_rt" / "__init__.py").is_file() else None


def install_hint(extra: str) -> str:
    """`pip install 'noop-rt[extra]'` for a wheel; from a clone (where pip finds no noop-rt on the index),
    `pip install -e '<the clone>[extra]'`."""
    root = source_checkout()
    if root is None:
        return f"pip install 'noop-rt[{extra}]'"
    try:
        where = os.path.relpath(root)
    except ValueError:  # another drive (Windows)
        where = str(root)
    return f"pip install -e '{root if where.startswith('..') else where}[{extra}]'"


def require_torch_side(what: str) -> None:
    """Refuse `what` in one line, with the install hint, where torch, diffusers or transformers is missing."""
    missing = [m for m in TORCH_SIDE if not installed(m)]
    if missing:
        raise MissingDependencyError(f"{what} needs {', '.join(missing)}: {install_hint('train')}")
