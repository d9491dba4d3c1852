"""The onnxruntime backend: one InferenceSession per bundle graph, created on first use (only the graphs the method
needs are loaded). CUDA execution provider when onnxruntime-gpu and an NVIDIA GPU are there, else the CPU provider.
The provider that actually runs is read back from the session (`get_providers()`), never assumed: onnxruntime falls
back to the CPU silently.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from noop_rt.errors import BundleError, MissingDependencyError
from noop_rt.runtime.backend import cuda_index, installed, nvidia_gpus
from noop_rt.runtime.bundle import Bundle

GPU_HINT = ("the GPU build replaces the CPU one: pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
            "(on a machine with an NVIDIA GPU, CUDA 12/13 and cuDNN 9)")


def unavailable() -> str | None:
    """Why this backend cannot run here, or None."""
    if not installed("onnxruntime"):
        return "onnxruntime is not installed (pip install onnxruntime)"
    return both_builds_installed()


def both_builds_installed() -> str | None:
    """onnxruntime (CPU) and onnxruntime-gpu are one module in two distributions: with both installed, whichever
    was installed last shadows the other, silently."""
    from importlib import metadata

    names = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            names.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(names) == 2:
        return ("both onnxruntime and onnxruntime-gpu are installed and shadow each other: pip uninstall -y "
                "onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (GPU) or onnxruntime (CPU)")
    return None


def cuda_unavailable() -> str | None:
    """Why onnxruntime cannot run on a GPU here, or None."""
    if unavailable():
        return unavailable()
    if not nvidia_gpus():
        return "no NVIDIA GPU"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime has no CUDA execution provider ({GPU_HINT})"
    return None


def providers(device: str) -> list[Any]:
    """onnxruntime's execution providers for `cpu` or `cuda[:N]` (the GPU index honoured, never hard-coded 0)."""
    if device.startswith("cuda"):
        return [("CUDAExecutionProvider", {"device_id": cuda_index(device)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeRunner:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.want_cuda = device.startswith("cuda")
        if self.want_cuda and cuda_unavailable():
            raise MissingDependencyError(f"--device {device}: {cuda_unavailable()}")
        self.providers = providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:  # a share of the cores (batch workers, server replicas): do not spin on the others' cores
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options = opts
        self.sessions: dict[str, Any] = {}
        self.device = f"cuda:{cuda_index(device)}" if self.want_cuda else "CPUExecutionProvider"

    def has(self, graph: str) -> bool:
        return self.bundle.has(graph)

    def load(self, graph: str) -> None:
        self.session(graph)

    def session(self, graph: str) -> Any:
        if graph not in self.sessions:
            import onnxruntime as ort

            path = self.bundle.path(graph)
            try:
                session = ort.InferenceSession(str(path), self.options, providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise BundleError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
            ran = session.get_providers()[0]
            if self.want_cuda and ran != "CUDAExecutionProvider":
                raise BundleError(f"onnxruntime did not start the CUDA provider for {path.name} (ran {ran}); check "
                                  f"CUDA/cuDNN: {GPU_HINT}")
            self.sessions[graph] = session
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        return self.session(graph).run(list(outputs), feeds)

    def close(self) -> None:
        self.sessions.clear()


def note_cpu_fallback() -> None:
    print(f"note: an NVIDIA GPU is present but onnxruntime has no CUDA provider, so the bundle runs on the CPU; "
          f"{GPU_HINT}", file=sys.stderr)
