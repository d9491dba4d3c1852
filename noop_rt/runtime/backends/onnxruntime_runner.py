"""The onnxruntime backend: one InferenceSession per bundle graph, created on first use (only the graphs the method
needs are loaded). CUDA execution provider when onnxruntime-gpu and an NVIDIA GPU are there, else the CPU provider.
The provider that actually runs is read back from the session (`get_providers()`), never assumed: onnxruntime falls
back to the CPU silently.

On CUDA the graphs run through IO binding: per (graph, input shapes, outputs) the inputs and outputs are bound once to
device OrtValues, a call copies the host inputs into them (`update_inplace`), runs, and reads the outputs back (only
images or latents go in and (B, C) errors/probabilities come out, so no torch is needed). The same binding code runs
on the CPU when asked (`io_binding=True`, or NOOP_RT_ORT_IOBINDING=1), which is how it is tested without a GPU.
`cuda_graph=True` (or NOOP_RT_ORT_CUDA_GRAPH=1) also runs the NoOp classifier graph through onnxruntime's CUDA
graphs: its shapes are static per batch, and one session captures one graph, so each captured shape gets a session
of its own (at most MAX_CUDA_GRAPH_SESSIONS; other shapes take the bound path). No device-wide synchronize per call:
`run_with_iobinding` returns when the outputs are ready, and reading them back is the only copy.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from noop_rt.runtime.backends.base import GraphRunner, cuda_index, env_flag, installed, nvidia_gpus
from noop_rt.runtime.backends.shape_cache import ShapeCache, host_array, signature
from noop_rt.runtime.bundle import Bundle
from noop_rt.runtime.errors import BadInputError, BundleError, MissingDependencyError
from noop_rt.runtime.graph_specs import CLASSES, CLASSIFIER, GraphSpec

IOBINDING_ENV = "NOOP_RT_ORT_IOBINDING"  # 1: bind inputs/outputs once per shape (the default on CUDA); 0: session.run
CUDA_GRAPH_ENV = "NOOP_RT_ORT_CUDA_GRAPH"  # 1: the classifier graph through CUDA graphs (CUDA only; default off)
WEIGHTS_ENV = "NOOP_RT_ORT_WEIGHTS"  # CPU: "packed" (default) or "mapped" (see WEIGHT_MODES)
WEIGHT_MODES = {
    # onnxruntime's defaults: every optimization; MatMul/Conv weights repacked (prepacking, NCHWc layouts) into heap
    # copies, after which the memory-mapped originals are released: the weights end up on the heap, once per session
    "packed": "prepacked heap copies per session (onnxruntime's defaults)",
    # no prepacking and no layout-changing optimizations (ORT_ENABLE_EXTENDED): the weights are used in place from
    # the memory-mapped weights.bin (page-aligned offsets), file-backed pages the OS shares and can drop
    "mapped": "used in place from the memory-mapped weights.bin (no prepacking, ORT_ENABLE_EXTENDED)",
}
MAX_BINDINGS = 8  # bound signatures kept per runner (least recently used go)
MAX_CUDA_GRAPH_SESSIONS = 2  # captured shapes: each is a session of its own, with its own copy of the weights
CAPTURE_RUNS = 2  # a CUDA-graph session runs once plainly, then captures (and replays) on its next run
CUDA_GRAPH_GRAPHS = (CLASSIFIER,)  # the static-shape NoOp pass
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
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


def providers(device: str, cuda_graph: bool = False) -> list[Any]:
    """onnxruntime's execution providers for `cpu` or `cuda[:N]` (the GPU index honoured, never hard-coded 0);
    `cuda_graph`: the CUDA provider captures the session's graph on its first runs and replays it after."""
    if device.startswith("cuda"):
        options: dict[str, Any] = {"device_id": cuda_index(device)}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def typed_feeds(spec: GraphSpec | None, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds as contiguous arrays of the dtypes the graph's spec gives (float32 / int64): what a bound OrtValue of
    that signature accepts. Inputs the spec does not name go as they are (the session then rejects them)."""
    dtypes = {t.name: t.dtype for t in spec.inputs} if spec is not None else {}
    return {name: np.ascontiguousarray(a, dtype=NUMPY_DTYPES.get(dtypes.get(name, "")))
            for name, a in feeds.items()}


def output_shapes(spec: GraphSpec, feeds: dict[str, np.ndarray], outputs: Sequence[str],
                  defaults: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named outputs for these feeds: each named axis sized by the first fed input that has it, else
    by `defaults` (the classifier's classes when its class embeddings are not fed). KeyError for an output the spec
    lacks or an axis nothing sizes (the caller then runs unbound)."""
    dims: dict[str, int] = {}
    for tensor in spec.inputs:
        if tensor.name in feeds:
            shape = feeds[tensor.name].shape
            if len(shape) != len(tensor.shape):
                raise KeyError(f"{tensor.name} has {len(shape)} dims, the spec {len(tensor.shape)}")
            for dim, size in zip(tensor.shape, shape, strict=True):
                if isinstance(dim, str):
                    dims.setdefault(dim, int(size))
    by_name = {t.name: t for t in spec.outputs}
    shapes = {}
    for name in outputs:
        tensor = by_name[name]
        shapes[name] = tuple(int(d) if not isinstance(d, str) else dims[d] if d in dims else int(defaults[d])
                             for d in tensor.shape)
    return shapes


class Bound:
    """One session's IO binding for one input signature: an OrtValue on the device for every fed input and every
    wanted output, bound once. A call copies the host inputs into the bound inputs, runs, and reads the outputs
    back. The addresses never change, which is what a CUDA-graph session needs."""

    def __init__(self, session: Any, device_type: str, device_id: int, feeds: dict[str, np.ndarray],
                 shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any], captured: bool = False) -> None:
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype.type, device_type,
                                                              device_id)
            self.binding.bind_ortvalue_input(name, value)
            self.inputs[name] = value
        for name, shape in shapes.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtypes[name], device_type, device_id)
            self.binding.bind_ortvalue_output(name, value)
            self.outputs[name] = value
        self.on_host = device_type == "cpu"  # OrtValue.numpy() is then a view of the bound buffer
        self.captured = captured  # a CUDA-graph session of its own
        self.calls = 0
        self.lock = threading.Lock()  # one call at a time on the shared buffers (a session alone is thread-safe)

    def __call__(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        with self.lock:
            for name, value in self.inputs.items():
                value.update_inplace(feeds[name])  # host -> bound buffer (a copy to the GPU on CUDA)
            self.session.run_with_iobinding(self.binding)
            self.calls += 1
            return [host_array(self.outputs[name].numpy(), self.on_host) for name in outputs]


class OnnxRuntimeRunner(GraphRunner):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, *,
                 io_binding: bool | None = None, cuda_graph: bool | None = None, weights: str | None = None) -> None:
        """`io_binding`: bind inputs/outputs once per shape (None: NOOP_RT_ORT_IOBINDING, default on for CUDA, off
        on the CPU); `cuda_graph`: the classifier graph through CUDA graphs (None: NOOP_RT_ORT_CUDA_GRAPH, default
        off; CUDA only, ignored on the CPU; implies IO binding); `weights`: how the CPU holds the weights, a key of
        WEIGHT_MODES (None: NOOP_RT_ORT_WEIGHTS, default "packed")."""
        import onnxruntime as ort

        self.bundle = bundle
        self.want_cuda = device.startswith("cuda")
        if self.want_cuda and cuda_unavailable():
            raise MissingDependencyError(f"--device {device}: {cuda_unavailable()}")
        self.cuda_graph = self.want_cuda and (env_flag(CUDA_GRAPH_ENV, False) if cuda_graph is None else cuda_graph)
        self.io_binding = self.cuda_graph or (env_flag(IOBINDING_ENV, self.want_cuda) if io_binding is None
                                              else io_binding)
        self.device_type, self.device_id = ("cuda", cuda_index(device)) if self.want_cuda else ("cpu", 0)
        self.device_name = device
        self.providers = providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:  # a share of the cores (batch workers, server replicas): do not spin on the others' cores
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.weights = weights or os.environ.get(WEIGHTS_ENV) or "packed"
        if self.weights not in WEIGHT_MODES:
            raise BadInputError(f"{WEIGHTS_ENV}={self.weights!r}: use one of {', '.join(WEIGHT_MODES)}")
        if self.weights == "mapped" and not self.want_cuda:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self.options = opts
        self.sessions: dict[str, Any] = {}
        self.device = f"cuda:{cuda_index(device)}" if self.want_cuda else "CPUExecutionProvider"
        self._specs: dict[str, GraphSpec] | None = None  # read from the manifest when a binding needs them
        self.bindings: ShapeCache[Bound] = ShapeCache(MAX_BINDINGS, evict=True)
        self.captured: ShapeCache[Bound] = ShapeCache(MAX_CUDA_GRAPH_SESSIONS, evict=False)  # CUDA-graph sessions
        self.notes: list[str] = []  # fallbacks taken (a CUDA graph that could not be captured)
        self._lock = threading.Lock()  # the binding caches

    @property
    def specs(self) -> dict[str, GraphSpec]:
        """The manifest's graph descriptions (tensor names, shapes, dtypes), for IO binding."""
        if self._specs is None:
            self._specs = self.bundle.graphs
        return self._specs

    def has(self, graph: str) -> bool:
        return self.bundle.has(graph)

    def load(self, graph: str) -> None:
        self.session(graph)

    def session(self, graph: str) -> Any:
        if graph not in self.sessions:
            self.sessions[graph] = self._new_session(graph, self.providers)
        return self.sessions[graph]

    def _new_session(self, graph: str, provider_list: list[Any]) -> Any:
        import onnxruntime as ort

        path = self.bundle.path(graph)
        try:
            session = ort.InferenceSession(str(path), self.options, providers=provider_list)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
        ran = session.get_providers()[0]
        if self.want_cuda and ran != "CUDAExecutionProvider":
            raise BundleError(f"onnxruntime did not start the CUDA provider for {path.name} (ran {ran}); check "
                              f"CUDA/cuDNN: {GPU_HINT}")
        return session

    def graph_spec(self, graph: str) -> GraphSpec | None:
        return self.bundle.graph_spec(graph)

    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session(graph).run(list(outputs), feeds)
        feeds = typed_feeds(self.specs.get(graph), feeds)
        key = (graph, signature(feeds), tuple(outputs))
        with self._lock:
            bound = self._binding(graph, key, feeds, outputs)
        if bound is None:  # no spec for an output shape: run unbound
            return self.session(graph).run(list(outputs), feeds)
        if not bound.captured:
            return bound(feeds, outputs)
        try:  # pragma: no cover - CUDA graphs: not run here
            return bound(feeds, outputs)
        except Exception as exc:  # onnxruntime captures during its first runs: a capture that fails falls back
            if bound.calls >= CAPTURE_RUNS:
                raise
            with self._lock:
                self._graphs_off(graph, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
                self.captured.clear()
                bound = self.bindings.try_add(key, lambda: self._bind(graph, feeds, outputs))
            return bound(feeds, outputs) if bound is not None else self.session(graph).run(list(outputs), feeds)

    def _graphs_off(self, graph: str, why: str) -> None:
        """One failure turns CUDA graphs off for this runner (noted, and said on stderr)."""
        self.cuda_graph = False
        self.notes.append(f"onnxruntime CUDA graph for the {graph} graph not used: {why}")
        print(f"note: {self.notes[-1]}", file=sys.stderr)

    def _binding(self, graph: str, key: Any, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> Bound | None:
        if self.cuda_graph and graph in CUDA_GRAPH_GRAPHS:  # CUDA only: not run here (no GPU on this machine)
            bound = self.captured.try_add(key, lambda: self._bind(graph, feeds, outputs, captured=True))
            if bound is not None:
                return bound
            if key in self.captured.failures:
                self._graphs_off(graph, self.captured.failures[key])
        return self.bindings.try_add(key, lambda: self._bind(graph, feeds, outputs))

    def _bind(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str], captured: bool = False) \
            -> Bound:
        """The binding of this signature: on the graph's session, or (`captured`) on a new CUDA-graph session of
        its own (one session captures one graph)."""
        spec = self.specs[graph]
        defaults = {CLASSES: len(self.bundle.classes)}  # the classifier's built-in class embeddings
        shapes = output_shapes(spec, feeds, outputs, defaults)
        dtypes = {t.name: NUMPY_DTYPES[t.dtype] for t in spec.outputs}
        session = (self._new_session(graph, providers(self.device_name, cuda_graph=True)) if captured
                   else self.session(graph))
        return Bound(session, self.device_type, self.device_id, feeds, shapes, dtypes, captured=captured)

    def release(self, graph: str) -> None:
        """Drop one graph's session to free its memory (bindings hold it too: all are dropped); it is created again
        when next used."""
        if self.sessions.pop(graph, None) is not None:
            self.captured.clear()
            self.bindings.clear()

    def close(self) -> None:
        self.captured.clear()
        self.bindings.clear()
        self.sessions.clear()


def note_cpu_fallback() -> None:
    print(f"note: an NVIDIA GPU is present but onnxruntime has no CUDA provider, so the bundle runs on the CPU; "
          f"{GPU_HINT}", file=sys.stderr)
