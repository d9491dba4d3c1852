"""The TensorRT backend: one deserialised plan per bundle graph (built by `noop-rt build`), run on host numpy arrays.

Written for users who have TensorRT (>= 10), Polygraphy and an NVIDIA GPU; NOT run in this project (TensorRT cannot be
installed on its machines). So the TensorRT calls are few and thin, and everything that decides something is a pure
function unit-tested without TensorRT: the optimisation profiles, the cache key, whether a build.json may be used
here (`plan_problem`), shape binding and its error (`bind_shapes`), output shapes read back from the execution
context (`output_shapes`), and splitting a call that exceeds the engine's profile (`run_split`).

The plan contract (profiles, cache keys, build.json, "is TensorRT usable here") is `tensorrt_plans.py`, the CUDA-graph
helper `tensorrt_cuda_graph.py`. No torch: buffers and the stream are Polygraphy's CUDA wrappers
(`polygraphy.cuda.DeviceArray`, `Stream`).

CUDA graphs (`cuda_graph=True`, or NOOP_RT_TRT_CUDA_GRAPH=1; off by default until measured): the NoOp classifier
engine's shapes are static per batch, so after a shape's first (plain) `execute_async_v3`, that call is captured on the
runner's stream into a CUDA graph (cudaStreamBeginCapture ... cudaGraphInstantiateWithFlags, through the CUDA runtime
that Polygraphy loads, as `set_device` does) and later calls of that shape launch the graph. A graph holds the device
addresses it was captured with, so `GraphCache` drops every graph when a buffer moves (grew); that policy is pure and
unit-tested, the CUDA calls (`_CudaGraph`) are thin and NOT run here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.runtime.backends.base import GraphRunner, cuda_index, env_flag
from noop_rt.runtime.backends.shape_cache import signature
from noop_rt.runtime.backends.tensorrt_cuda_graph import MAX_CUDA_GRAPHS, GraphCache, _CudaGraph, buffer_addresses
from noop_rt.runtime.backends.tensorrt_plans import (
    TRT_HINT,
    axis_limits,
    decide,
    default_engines_dir,
    describe_range,
    environment,
    plan_problem,
    read_record,
    set_device,
)
from noop_rt.runtime.errors import EngineError, MissingDependencyError
from noop_rt.runtime.graph_specs import BATCH, CLASSES, CLASSIFIER, PROMPTS, SCORER, TEXT_ENCODER, GraphSpec

# Axes along which a graph's rows are independent: a call larger than the engine's profile is split along them and
# the outputs concatenated. Never the classifier's classes axis: its `probs` is a softmax over all classes.
SPLIT_AXES: dict[str, tuple[str, ...]] = {SCORER: (BATCH, CLASSES), TEXT_ENCODER: (PROMPTS,)}
DEFAULT_SPLIT_AXES = (BATCH,)
CUDA_GRAPH_ENV = "NOOP_RT_TRT_CUDA_GRAPH"  # 1: the classifier engine through CUDA graphs (default off)
CUDA_GRAPH_GRAPHS = (CLASSIFIER,)  # the static NoOp profile




# ----------------------------------------------------------------------------------------------- pure run-time steps
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
                "UINT8": np.uint8, "BOOL": np.bool_}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a tensorrt.DataType (by its name: DataType.FLOAT -> float32)."""
    key = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1].upper()
    if key not in NUMPY_DTYPES:
        raise EngineError(f"an engine tensor has TensorRT type {key}, which has no numpy type")
    return np.dtype(NUMPY_DTYPES[key])


def engine_feeds(graph: str, inputs: dict[str, np.dtype], feeds: dict[str, np.ndarray],
                 defaults: dict[str, Callable[[], np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays to bind for the engine's `inputs` ({name: dtype}): contiguous, of the engine's dtypes. An input
    the caller did not feed takes its default (the classifier's class embeddings, when TensorRT kept them as an
    input); a feed the engine has no input for is an error (TensorRT baked that tensor in as weights)."""
    extra = sorted(set(feeds) - set(inputs))
    if extra:
        raise EngineError(f"the {graph} engine has no input {', '.join(extra)} (TensorRT built it in as weights; "
                          f"its inputs: {', '.join(inputs)})")
    out = {}
    for name, dtype in inputs.items():
        if name in feeds:
            out[name] = np.ascontiguousarray(feeds[name], dtype=dtype)
        elif name in defaults:
            out[name] = np.ascontiguousarray(defaults[name](), dtype=dtype)
        else:
            raise EngineError(f"the {graph} engine needs input {name!r}, which was not given")
    return out


def bind_shapes(context: Any, graph: str, feeds: dict[str, np.ndarray], profile: dict[str, Any]) -> None:
    """Set each input's shape on the execution context, checking TensorRT's answer (False: outside the profile)."""
    for name, array in feeds.items():
        shape = tuple(int(d) for d in array.shape)
        if not context.set_input_shape(name, shape):
            raise EngineError(f"TensorRT refused shape {shape} for input {name!r} of the {graph} engine "
                              f"({describe_range(profile, name)}); rebuild it (noop-rt build --force) or pass a "
                              "smaller --max-batch")


def output_shapes(context: Any, graph: str, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Output shapes as the context infers them from the bound input shapes (never assumed from the spec)."""
    shapes = {}
    for name in names:
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise EngineError(f"TensorRT could not infer the shape of output {name!r} of the {graph} engine "
                              f"(got {shape}); are all its inputs bound?")
        shapes[name] = shape
    return shapes


def axis_size(spec: GraphSpec, feeds: dict[str, np.ndarray], axis: str) -> int | None:
    for tensor in spec.inputs:
        if axis in tensor.shape and tensor.name in feeds:
            return int(feeds[tensor.name].shape[tensor.shape.index(axis)])
    return None


def split_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray], axis: str, step: int) -> list[dict[str, np.ndarray]]:
    """`feeds` cut into pieces of at most `step` along the named `axis` (tensors without that axis go whole)."""
    size = axis_size(spec, feeds, axis) or 0
    where = {t.name: t.shape.index(axis) for t in spec.inputs if axis in t.shape}
    parts = []
    for start in range(0, size, step):
        cut = slice(start, start + step)
        parts.append({name: (a[(slice(None),) * where[name] + (cut,)] if name in where else a)
                      for name, a in feeds.items()})
    return parts


def join_outputs(spec: GraphSpec, outputs: Sequence[str], parts: list[list[np.ndarray]], axis: str) \
        -> list[np.ndarray]:
    """The outputs of split calls put back together along `axis`."""
    joined = []
    for i, name in enumerate(outputs):
        tensor = next((t for t in spec.outputs if t.name == name), None)
        if tensor is None or axis not in tensor.shape:
            raise EngineError(f"cannot split the {spec.name} graph along {axis}: output {name} has no such axis")
        joined.append(np.concatenate([p[i] for p in parts], axis=tensor.shape.index(axis)))
    return joined


def run_split(spec: GraphSpec, feeds: dict[str, np.ndarray], outputs: Sequence[str], limits: dict[str, int],
              axes: Sequence[str], execute: Callable[[dict[str, np.ndarray]], list[np.ndarray]]) -> list[np.ndarray]:
    """Run `execute` on `feeds`, split along the first axis of `axes` whose size exceeds the engine's profile
    limit (recursively, so rows and classes can both be split); outputs joined in order."""
    for axis in axes:
        size, limit = axis_size(spec, feeds, axis), limits.get(axis)
        if size is not None and limit is not None and size > limit:
            parts = [run_split(spec, part, outputs, limits, axes, execute)
                     for part in split_feeds(spec, feeds, axis, limit)]
            return join_outputs(spec, outputs, parts, axis)
    return execute(feeds)


# ----------------------------------------------------------------------------------------------- the runner
class _Engine:
    """One deserialised plan, its execution context and its device buffers."""

    def __init__(self, trt: Any, runtime: Any, plan: Path, graph: str) -> None:
        try:
            data = plan.read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read {plan}: {exc.strerror}") from None
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {plan}; rebuild it (noop-rt build --force)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {plan} (out of GPU memory?)")
        self.inputs: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            target = self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs
            target[name] = numpy_dtype(self.engine.get_tensor_dtype(name))
        self.buffers: dict[str, Any] = {}
        self.graph = graph
        self.graphs: GraphCache[_CudaGraph] = GraphCache(MAX_CUDA_GRAPHS, lambda g: g.free())

    def buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        from polygraphy import cuda
        from polygraphy.datatype import DataType

        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = cuda.DeviceArray(shape=shape, dtype=DataType.from_dtype(dtype))
        else:
            buf.resize(shape)  # reallocates only when it grows
        if not self.context.set_tensor_address(name, buf.ptr):
            raise EngineError(f"TensorRT refused the device address of {name!r} in the {self.graph} engine")
        return buf

    def free(self) -> None:
        self.graphs.clear()  # before the buffers their graphs point at
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()
        self.context = None
        self.engine = None


class TensorRTRunner(GraphRunner):
    """GraphRunner over the plans of `noop-rt build`: each plan deserialised on first use, device buffers kept per
    tensor and grown as needed, one CUDA stream; host numpy arrays in and out. NOT run here (no TensorRT)."""

    name = "tensorrt"
    # TensorRT's ONNX parser reads an initializer that is also a graph input as weights: the classifier's built-in
    # class embeddings are baked into its plan, so other class sets go through the encoder/noise/scorer graphs.
    classifier_takes_embeddings = False

    def __init__(self, bundle: Any, engines_dir: Path | None, device: str, *, cuda_graph: bool | None = None) -> None:
        """`cuda_graph`: the classifier engine through CUDA graphs (None: NOOP_RT_TRT_CUDA_GRAPH, default off)."""
        try:
            import tensorrt as trt
            from polygraphy import cuda
        except ImportError:
            raise MissingDependencyError(TRT_HINT) from None
        self.trt = trt
        self.bundle = bundle
        self.engines_dir = engines_dir or default_engines_dir(bundle)
        self.index = cuda_index(device)
        env = environment(self.index, trt)  # checks that cuda:N exists
        record = read_record(self.engines_dir)
        action, reason = decide(plan_problem(record, env, bundle, self.engines_dir), building=False)
        if action != "use":
            raise EngineError(f"cannot use the TensorRT engines in {self.engines_dir} on cuda:{self.index}: {reason}")
        self.record: dict[str, Any] = record or {}
        set_device(self.index)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = cuda.Stream()
        self.specs: dict[str, GraphSpec] = bundle.graphs
        self.engines: dict[str, _Engine] = {}
        self.device = f"cuda:{self.index} ({env['gpu']})"
        self._class_embeddings: np.ndarray | None = None
        self.cuda_graph = env_flag(CUDA_GRAPH_ENV, False) if cuda_graph is None else cuda_graph
        self.notes: list[str] = []

    def has(self, graph: str) -> bool:
        return graph in self.specs and graph in self.record.get("graphs", {})

    def load(self, graph: str) -> None:
        self._engine(graph)

    def _engine(self, graph: str) -> _Engine:
        if graph not in self.engines:
            if not self.has(graph):
                raise EngineError(f"the TensorRT engines in {self.engines_dir} have no {graph} graph")
            set_device(self.index)
            plan = self.engines_dir / str(self.record["graphs"][graph].get("plan") or f"{graph}.plan")
            self.engines[graph] = _Engine(self.trt, self.runtime, plan, graph)
        return self.engines[graph]

    def _defaults(self, graph: str) -> dict[str, Callable[[], np.ndarray]]:
        return {"class_embeddings": self._trained_embeddings} if graph == CLASSIFIER else {}

    def _trained_embeddings(self) -> np.ndarray:
        if self._class_embeddings is None:
            self._class_embeddings = self.bundle.class_embeddings()
        return self._class_embeddings

    def graph_spec(self, graph: str) -> GraphSpec | None:
        return self.specs.get(graph)

    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        if not self.has(graph):
            raise EngineError(f"the TensorRT engines in {self.engines_dir} have no {graph} graph")
        from polygraphy.exception import PolygraphyException

        spec = self.specs[graph]
        profile = self.record["graphs"][graph].get("profile") or {}
        try:
            return run_split(spec, feeds, list(outputs), axis_limits(spec, profile),
                             SPLIT_AXES.get(graph, DEFAULT_SPLIT_AXES),
                             lambda part: self._execute(graph, part, outputs))
        except PolygraphyException as exc:  # CUDA allocation/copy errors from Polygraphy's wrapper
            raise EngineError(f"CUDA error running the {graph} engine: {str(exc).strip().splitlines()[0]}") from None

    def _execute(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        set_device(self.index)  # the calling thread may have another current device
        eng = self._engine(graph)
        unknown = [o for o in outputs if o not in eng.outputs]
        if unknown:
            raise EngineError(f"the {graph} engine has no output {', '.join(unknown)}")
        arrays = engine_feeds(graph, eng.inputs, feeds, self._defaults(graph))
        bind_shapes(eng.context, graph, arrays, self.record["graphs"][graph].get("profile") or {})
        for name, array in arrays.items():
            eng.buffer(name, array.shape, array.dtype).copy_from(array, self.stream)
        shapes = output_shapes(eng.context, graph, list(eng.outputs))
        device_out = {name: eng.buffer(name, shapes[name], eng.outputs[name]) for name in eng.outputs}
        self._enqueue(graph, eng, arrays)
        host = [np.empty(shapes[o], dtype=eng.outputs[o]) for o in outputs]
        for name, array in zip(outputs, host, strict=True):
            device_out[name].copy_to(array, self.stream)
        self.stream.synchronize()
        return [a.astype(np.float32) if a.dtype == np.float16 else a for a in host]  # float I/O is float32

    def _enqueue(self, graph: str, eng: _Engine, arrays: dict[str, np.ndarray]) -> None:
        """Launch this shape's CUDA graph, else execute (and then capture the shape's graph, when asked)."""
        use_graphs = self.cuda_graph and graph in CUDA_GRAPH_GRAPHS
        key = signature(arrays) if use_graphs else None
        if use_graphs:  # pragma: no cover - needs TensorRT and a GPU: not run here
            captured = eng.graphs.lookup(key, buffer_addresses(eng.buffers))
            if captured is not None:
                captured.launch(self.stream.ptr)
                return
        if not eng.context.execute_async_v3(self.stream.ptr):
            raise EngineError(f"TensorRT execution of the {graph} engine failed (see TensorRT's log above)")
        if use_graphs:  # pragma: no cover - after a plain execute of the new shapes, as TensorRT asks
            made = eng.graphs.try_add(key, lambda: _CudaGraph(eng.context, self.stream.ptr))
            if made is None and eng.graphs.failure(key):
                self.cuda_graph = False
                self.notes.append(f"TensorRT CUDA graph for the {graph} engine not used: {eng.graphs.failure(key)}")
                print(f"note: {self.notes[-1]}", file=sys.stderr)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        engines = getattr(self, "engines", {})
        for eng in engines.values():
            eng.free()
        engines.clear()
        stream, self.stream = getattr(self, "stream", None), None
        if stream is not None:
            stream.free()
