"""The runner contract: run one of a model's graphs by name on numpy arrays. One module per engine implements it
(onnxruntime, OpenVINO, TensorRT, torch); `runtime/opener.py` picks one. Nothing here imports an engine.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.graph_specs import OPTIONAL_INPUTS, GraphSpec

ROBUST_NEEDS_TORCH = ("--robust needs the torch backend (it takes gradients through the model): load the checkpoint "
                      "(NAME.pt)")


class GraphRunner(ABC):
    """Runs a model's graphs (`graph_specs.py` names and tensors) on host numpy arrays, one engine per subclass.

    `run` checks the feeds against the graph's description (names, dtypes, ranks, fixed and shared dynamic sizes)
    and raises one line naming the graph and the input before the engine sees them; subclasses write `_run`. The
    optional capabilities are plain methods and attributes with defaults, overridden where an engine has them.
    """

    name: ClassVar[str]  # "onnxruntime" | "openvino" | "tensorrt" | "torch"
    device: str  # what actually runs, read back from the engine: "CPUExecutionProvider", "cuda:0", "CPU"
    # whether the classifier graph's `class_embeddings` input may be fed (else it runs only the trained classes)
    classifier_takes_embeddings: ClassVar[bool] = True
    # what the engine computes in where it differs from the graph's precision (OpenVINO's bf16 on some CPUs)
    execution_precision: str | None = None

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """Run `graph` on `feeds`; returns the named outputs as float32/int64 numpy arrays, in order. A feed given
        as None is left out (the classifier's class embeddings then default to the trained classes')."""
        feeds = {name: value for name, value in feeds.items() if value is not None}
        spec = self.graph_spec(graph)
        if spec is not None:
            check_feeds(spec, feeds, outputs)
        return self._run(graph, feeds, outputs)

    @abstractmethod
    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """The engine's own inference on checked feeds."""

    @abstractmethod
    def has(self, graph: str) -> bool:
        """Whether this model has `graph` (an SD folder has no classifier or noise graph)."""

    def graph_spec(self, graph: str) -> GraphSpec | None:
        """The graph's description, which `run` checks feeds against; None: not checked."""
        return None

    def load(self, graph: str) -> None:  # noqa: B027 - optional: engines that create sessions lazily override it
        """Create the graph's session now, so the first image's time is inference, not start-up."""

    def purify(self, images: np.ndarray, config: Any) -> np.ndarray:
        """RDC likelihood maximisation on images (B, 3, H, W): needs gradients through the model."""
        raise BadInputError(f"{ROBUST_NEEDS_TORCH} (the {self.name} graphs are forward-only)")

    def synchronize(self) -> None:  # noqa: B027 - optional: only asynchronous (GPU) engines wait
        """Wait for queued device work, so timers measure it."""

    def unet_gflop(self) -> float | None:
        """GFLOP of one UNet sample, where the engine can count it (the torch backend); None otherwise."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: engines with sessions or device memory free them
        """Free sessions and device memory."""

    def __enter__(self) -> GraphRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> None:
    """Refuse feeds that do not fit the graph: an unknown, missing or mistyped input, a wrong rank or size, or
    dynamic axes that disagree between inputs (z0 and eps of different batch sizes)."""
    known = {t.name for t in spec.inputs}
    extra = sorted(set(feeds) - known)
    if extra:
        raise BadInputError(f"the {spec.name} graph has no input {extra[0]!r} (its inputs: {', '.join(sorted(known))})")
    missing = [o for o in outputs if o not in {t.name for t in spec.outputs}]
    if missing:
        raise BadInputError(f"the {spec.name} graph has no output {missing[0]!r}")
    dims: dict[str, tuple[int, str]] = {}
    for t in spec.inputs:
        value = feeds.get(t.name)
        if value is None:
            if (spec.name, t.name) in OPTIONAL_INPUTS:
                continue
            raise BadInputError(f"the {spec.name} graph needs input {t.name!r}")
        if not isinstance(value, np.ndarray):
            raise BadInputError(f"the {spec.name} graph's input {t.name!r} is a {type(value).__name__}; expected a "
                                f"numpy array of {t.dtype}")
        if value.dtype != np.dtype(t.dtype):
            raise BadInputError(f"the {spec.name} graph's input {t.name!r} is {value.dtype}; expected {t.dtype}")
        if value.ndim != len(t.shape):
            raise BadInputError(f"the {spec.name} graph's input {t.name!r} has shape {tuple(value.shape)}; expected "
                                f"{len(t.shape)} axes {_shape_text(t.shape)}")
        for size, axis in zip(value.shape, t.shape, strict=True):
            if isinstance(axis, int) and size != axis:
                raise BadInputError(f"the {spec.name} graph's input {t.name!r} has shape {tuple(value.shape)}; "
                                    f"expected {_shape_text(t.shape)}")
            if isinstance(axis, str):
                seen = dims.setdefault(axis, (int(size), t.name))
                if seen[0] != size:
                    raise BadInputError(f"the {spec.name} graph's inputs {seen[1]!r} and {t.name!r} disagree on "
                                        f"the {axis} axis ({seen[0]} vs {size})")


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


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
