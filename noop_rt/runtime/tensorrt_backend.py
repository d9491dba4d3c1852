"""The TensorRT backend: one deserialised plan per bundle graph (built by `noop-rt build`), run on numpy inputs.

Written for users who have TensorRT and an NVIDIA GPU; NOT run in this project (TensorRT cannot be installed on its
machines). Kept thin; what surrounds it (which plans to use, staleness) is pure and unit-tested in `engines.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noop_rt.runtime.backend import installed, nvidia_gpus

TRT_HINT = ("TensorRT and an NVIDIA GPU are required: pip install 'noop-rt[tensorrt]' (tensorrt from NVIDIA's "
            "index, https://pypi.nvidia.com) on a machine with a CUDA GPU and driver")


def default_engines_dir(bundle: Any) -> Path:
    return Path("engines") / bundle.root.name


def unavailable(bundle: Any, engines_dir: Path | None) -> str | None:
    """Why TensorRT cannot run this bundle here, or None (cheap: imports nothing heavy unless engines exist)."""
    folder = engines_dir or default_engines_dir(bundle)
    if not installed("tensorrt"):
        return "tensorrt is not installed"
    if not nvidia_gpus():
        return "no NVIDIA GPU"
    if not (folder / "build.json").is_file():
        return f"no engines in {folder} (noop-rt build {bundle.root})"
    return "the TensorRT runner is not available in this version"


class TensorRTRunner:  # completed by the engines work (issue: engines at their limit)
    name = "tensorrt"

    def __init__(self, bundle: Any, engines_dir: Path | None, device: str) -> None:
        raise NotImplementedError
