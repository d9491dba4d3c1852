"""The OpenVINO backend (CPU): each bundle graph read once, compiled for the static shapes of the call (OpenVINO pays
off on static shapes: measured 1.5-1.8x onnxruntime on the demo UNet at batch 10 static, ~1x with the dynamic axis),
with the compiled-model cache (`CACHE_DIR`) in the user cache so a second start is fast.

A graph called with more than `MAX_STATIC` distinct shapes (the scorer under adaptive/pruned, whose class count
shrinks) falls back to one dynamic-shape compilation. OpenVINO reads an ONNX initializer that is also a graph input
as a constant, so the classifier graph keeps its built-in classes here; other class sets run through the encoder,
noise and scorer graphs (the same math).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from noop_rt.runtime.backends.base import GraphRunner
from noop_rt.runtime.bundle import Bundle, user_cache_dir
from noop_rt.runtime.errors import BadInputError, BundleError, MissingDependencyError
from noop_rt.runtime.graph_specs import GraphSpec

MAX_STATIC = 8  # static compilations kept per graph before a graph falls back to a dynamic one
PRECISION_ENV = "NOOP_RT_OPENVINO_PRECISION"  # f32 | bf16 | f16: OpenVINO's inference precision (default: its own)
PRECISIONS = ("f32", "bf16", "f16")


class OpenVinoRunner(GraphRunner):
    name = "openvino"
    classifier_takes_embeddings = False

    def __init__(self, bundle: Bundle, threads: int | None = None, hint: str = "LATENCY",
                 precision: str | None = None) -> None:
        """`precision`: OpenVINO's INFERENCE_PRECISION_HINT (None: NOOP_RT_OPENVINO_PRECISION, else OpenVINO's CPU
        default, which is bf16 on CPUs with AVX512_BF16 or AMX and f32 elsewhere)."""
        try:
            import openvino as ov
        except ImportError:
            from noop_rt.runtime.extras import install_hint

            raise MissingDependencyError(f"the openvino backend needs OpenVINO: {install_hint('openvino')}") \
                from None
        self.ov = ov
        self.bundle = bundle
        self.core = ov.Core()
        cache = user_cache_dir() / "openvino"
        try:
            cache.mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache)})
        except (OSError, RuntimeError):
            pass  # no persistent cache: every start compiles
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        precision = precision or os.environ.get(PRECISION_ENV) or None
        if precision is not None:
            if precision not in PRECISIONS:
                raise BadInputError(f"{PRECISION_ENV}={precision!r}: use one of {', '.join(PRECISIONS)}")
            self.config["INFERENCE_PRECISION_HINT"] = precision
        # what the graphs run in: the bundle's fp32 graphs run in bf16 where OpenVINO's CPU default says so
        default = self.core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        self.execution_precision = precision or default.get_type_name()
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.models: dict[str, Any] = {}
        self.static: dict[str, dict[tuple, Any]] = {}
        self.dynamic: dict[str, Any] = {}
        self.device = "CPU"

    def has(self, graph: str) -> bool:
        return self.bundle.has(graph)

    def _model(self, graph: str) -> Any:
        if graph not in self.models:
            path = self.bundle.path(graph)
            try:
                self.models[graph] = self.core.read_model(str(path))
            except RuntimeError as exc:
                raise BundleError(f"OpenVINO cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
        return self.models[graph]

    def _request(self, graph: str, feeds: dict[str, np.ndarray]) -> Any:
        shapes = tuple(sorted((k, v.shape) for k, v in feeds.items()))
        compiled = self.static.setdefault(graph, {})
        if shapes in compiled:
            return compiled[shapes]
        if len(compiled) >= MAX_STATIC:
            if graph not in self.dynamic:
                self.dynamic[graph] = self.core.compile_model(self._model(graph).clone(), "CPU",
                                                              self.config).create_infer_request()
            return self.dynamic[graph]
        model = self._model(graph).clone()
        names = {n for p in model.inputs for n in p.get_names()}
        model.reshape({name: self.ov.PartialShape(list(v.shape)) for name, v in feeds.items() if name in names})
        compiled[shapes] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return compiled[shapes]

    def graph_spec(self, graph: str) -> GraphSpec | None:
        return self.bundle.graph_spec(graph)

    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        request = self._request(graph, feeds)
        names = {n for p in request.model_inputs for n in p.get_names()}
        request.infer({k: v for k, v in feeds.items() if k in names})
        return [np.array(request.get_tensor(o).data, copy=True) for o in outputs]

    def close(self) -> None:
        self.static.clear()
        self.dynamic.clear()
