"""noop-rt: diffusion classifiers at one UNet pass per class (NoOp), deployed with ONNX Runtime, OpenVINO and
TensorRT. `noop_rt.load()` opens a classifier (the built-in demo by default)."""

from __future__ import annotations

from typing import Any

__version__ = "0.4.0"
__all__ = ["ClassScore", "Classifier", "LoadOptions", "NoopError", "Result", "__version__", "load"]


def __getattr__(name: str) -> Any:  # lazy: `import noop_rt` stays cheap for the CLI's --help
    if name in ("load", "Classifier", "Result", "ClassScore", "LoadOptions", "NoopError"):
        from noop_rt import api

        return getattr(api, name)
    raise AttributeError(f"module 'noop_rt' has no attribute {name!r}")
