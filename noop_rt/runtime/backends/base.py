"""The backend interface: run one of a model's graphs by name on numpy arrays. One module per backend implements it
(onnxruntime, OpenVINO, TensorRT, torch); `open.py` picks one. Nothing here imports an engine.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from noop_rt.runtime.errors import BadInputError

BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")


class GraphRunner(Protocol):
    """Runs a model's graphs (`runtime/graphs.py` names and tensors) on host numpy arrays."""

    name: str  # "onnxruntime" | "openvino" | "tensorrt" | "torch"
    device: str  # what actually runs, read back from the engine: "CPUExecutionProvider", "cuda:0", "CPU"

    def has(self, graph: str) -> bool:
        """Whether this model has `graph` (a checkpoint has no scorer-only graphs missing; an SD folder has no
        classifier or noise graph)."""
        ...

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """Run `graph` on `feeds`; returns the named outputs as float32/int64 numpy arrays, in order."""
        ...

    def close(self) -> None:
        """Free sessions and device memory."""
        ...


def installed(module: str) -> bool:
    """Whether a package can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def nvidia_gpus() -> int:
    """NVIDIA GPUs the driver lists (no CUDA library is loaded)."""
    folder = Path("/proc/driver/nvidia/gpus")
    try:
        return len(list(folder.iterdir()))
    except OSError:
        return 0 if os.name == "posix" else int(bool(os.environ.get("CUDA_VISIBLE_DEVICES")))


def env_flag(name: str, default: bool) -> bool:
    """A yes/no switch from the environment: 1/true/yes/on or 0/false/no/off; unset or empty: `default`."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BadInputError(f"{name}={os.environ[name]!r}: expected 1/0, true/false, yes/no or on/off")


def cuda_index(device: str) -> int:
    """`cuda:N` -> N (`cuda` -> 0)."""
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0
