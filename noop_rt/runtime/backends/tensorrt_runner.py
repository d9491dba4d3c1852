"""The TensorRT backend: one deserialised plan per bundle graph (built by `noop-rt build`), run on host numpy arrays.

Written for users who have TensorRT (>= 10), Polygraphy and an NVIDIA GPU; NOT run in this project (TensorRT cannot be
installed on its machines). So the TensorRT calls are few and thin, and everything that decides something is a pure
function unit-tested without TensorRT: the optimisation profiles, the cache key, whether a build.json may be used
here (`plan_problem`), shape binding and its error (`bind_shapes`), output shapes read back from the execution
context (`output_shapes`), and splitting a call that exceeds the engine's profile (`run_split`).

The pure helpers live here, in the runtime, because the runtime must decide whether engines are usable without
importing the build side (`noop_rt/build/engines.py` builds plans and imports them from here). No torch: buffers and the
stream are Polygraphy's CUDA wrappers (`polygraphy.cuda.DeviceArray`, `Stream`).

CUDA graphs (`cuda_graph=True`, or NOOP_RT_TRT_CUDA_GRAPH=1; off by default until measured): the NoOp classifier
engine's shapes are static per batch, so after a shape's first (plain) `execute_async_v3`, that call is captured on the
runner's stream into a CUDA graph (cudaStreamBeginCapture ... cudaGraphInstantiateWithFlags, through the CUDA runtime
that Polygraphy loads, as `set_device` does) and later calls of that shape launch the graph. A graph holds the device
addresses it was captured with, so `GraphCache` drops every graph when a buffer moves (grew); that policy is pure and
unit-tested, the CUDA calls (`_CudaGraph`) are thin and NOT run here.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from noop_rt.runtime.backends.base import cuda_index, env_flag, installed, nvidia_gpus
from noop_rt.runtime.backends.shape_cache import ShapeCache, signature
from noop_rt.runtime.errors import EngineError, MissingDependencyError
from noop_rt.runtime.graph_specs import BATCH, CLASSES, CLASSIFIER, PROMPTS, SCORER, TEXT_ENCODER, GraphSpec

FORMAT = "noop-rt.engines"
VERSION = 2  # 2: bundle format 2 (graphs + one weights file), profiles per named axis
BUILD_JSON = "build.json"
TRT_HINT = ("TensorRT and an NVIDIA GPU are required: pip install 'noop-rt[tensorrt]' (tensorrt from NVIDIA's "
            "index, https://pypi.nvidia.com, and polygraphy) on a machine with a CUDA GPU and driver")
TEXT_ENCODER_MAX_PROMPTS = 64  # GraphModel.embed sends at most this many prompts per call
# Axes along which a graph's rows are independent: a call larger than the engine's profile is split along them and
# the outputs concatenated. Never the classifier's classes axis: its `probs` is a softmax over all classes.
SPLIT_AXES: dict[str, tuple[str, ...]] = {SCORER: (BATCH, CLASSES), TEXT_ENCODER: (PROMPTS,)}
DEFAULT_SPLIT_AXES = (BATCH,)
Profile = dict[str, tuple[tuple[int, ...], ...]]  # input name -> (min shape, opt shape, max shape)
CUDA_GRAPH_ENV = "NOOP_RT_TRT_CUDA_GRAPH"  # 1: the classifier engine through CUDA graphs (default off)
CUDA_GRAPH_GRAPHS = (CLASSIFIER,)  # the static NoOp profile
MAX_CUDA_GRAPHS = 4  # captured shapes per engine
CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal


# ----------------------------------------------------------------------------------------------- profiles
def axis_ranges(manifest: dict[str, Any], graph: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per named axis of one graph's engine, from the bundle manifest.

    Images (classifier, vae_encoder, noise): batch 1 / 1 (one image online) / images_per_batch. Scorer rows: the
    rows of one full UNet call, max(1, max_batch // C), for opt and max (the zero-shot strategies fill whole calls).
    Classes: 1 / C / C. Text encoder: prompts 1 / C / max(C, 64)."""
    c = len(manifest["classes"])
    rows = max(1, int(manifest["max_batch"]) // max(1, c))
    images = int(manifest.get("images_per_batch") or rows)
    classes = (1, c, c)
    if graph == TEXT_ENCODER:
        return {PROMPTS: (1, c, max(c, TEXT_ENCODER_MAX_PROMPTS))}
    if graph == SCORER:
        return {BATCH: (1, rows, rows), CLASSES: classes}
    return {BATCH: (1, 1, images), CLASSES: classes}


def graph_profile(bundle: Any, graph: str) -> Profile:
    """The optimisation profile (per input: min/opt/max shapes) of one bundle graph."""
    spec: GraphSpec = bundle.graphs[graph]
    try:
        return spec.profile(axis_ranges(bundle.manifest, graph))
    except KeyError as exc:
        raise EngineError(f"no TensorRT profile rule for axis {exc} of the {graph} graph") from None


def profile_json(profile: Profile) -> dict[str, list[list[int]]]:
    return {name: [list(shape) for shape in shapes] for name, shapes in profile.items()}


def axis_limits(spec: GraphSpec, profile: dict[str, Any]) -> dict[str, int]:
    """Largest size per named axis the engine's profile allows (a recorded profile: input -> [min, opt, max])."""
    limits: dict[str, int] = {}
    for tensor in spec.inputs:
        shapes = profile.get(tensor.name)
        if not shapes:
            continue
        for pos, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                limits[dim] = min(limits.get(dim, int(shapes[2][pos])), int(shapes[2][pos]))
    return limits


def describe_range(profile: dict[str, Any], name: str) -> str:
    shapes = profile.get(name)
    if not shapes:
        return "no profile recorded for it"
    lo, opt, hi = (tuple(int(d) for d in s) for s in shapes)
    return f"profile min {lo}, opt {opt}, max {hi}"


# ----------------------------------------------------------------------------------------------- what a plan is for
def file_sha256(manifest: dict[str, Any], file: str | None) -> str | None:
    entry = manifest.get("files", {}).get(file) if file else None
    return entry.get("sha256") if isinstance(entry, dict) else None


def weights_sha256(manifest: dict[str, Any]) -> str | None:
    """sha256 of the bundle's shared external-weights file (every graph's plan bakes these weights in)."""
    return file_sha256(manifest, (manifest.get("weights") or {}).get("file"))


def engine_cache_key(onnx_sha256: str, weights_sha256: str | None, trt_version: str, gpu_name: str,
                     compute_capability: str, profile: Profile | dict[str, Any], precision: str,
                     flags: dict[str, Any]) -> str:
    """What a plan depends on: the ONNX bytes and its external weights, TensorRT version, GPU, profile shapes,
    precision and builder flags. The first 24 hex digits of the sha256 of these fields as sorted JSON."""
    blob = json.dumps({"onnx": onnx_sha256, "weights": weights_sha256, "trt": trt_version, "gpu": gpu_name,
                       "cc": compute_capability, "profile": _as_lists(profile), "precision": precision,
                       "flags": flags}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _as_lists(profile: Profile | dict[str, Any]) -> dict[str, list[list[int]]]:
    return {k: [[int(d) for d in s] for s in v] for k, v in profile.items()}


def read_record(engines_dir: Path) -> dict[str, Any] | None:
    """build.json of an engine folder; None when there is none, {} when it is unreadable."""
    path = engines_dir / BUILD_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def default_engines_dir(bundle: Any) -> Path:
    return Path("engines") / bundle.root.name


def plan_problem(record: dict[str, Any] | None, env: dict[str, str], bundle: Any, engines_dir: Path,
                 flags: dict[str, Any] | None = None) -> str | None:
    """None when the plans in `engines_dir` may be loaded for `bundle` on this machine, else the reason they may not.
    A pure function of build.json (`record`), the running environment (`env`: tensorrt, gpu, compute_capability)
    and the bundle's manifest. `flags`: the builder flags a build asks for (a plan built with other flags is
    rebuilt); None at run time (any flags will do)."""
    m = bundle.manifest
    if m.get("precision") != "fp16":
        return (f"TensorRT engines are built from fp16 bundles and {bundle.root} is {m.get('precision')} (re-export "
                "it with noop-rt export --ckpt NAME.pt --fp16)")
    if record is None:
        return f"no engines in {engines_dir} (run: noop-rt build {bundle.root})"
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        return f"{engines_dir / BUILD_JSON} is of another format or version (rebuild: noop-rt build {bundle.root})"
    if record.get("precision") != m.get("precision"):
        return f"built {record.get('precision')} engines, the bundle is {m.get('precision')}"
    if record.get("tensorrt") != env.get("tensorrt"):
        return f"built with TensorRT {record.get('tensorrt')}, this machine runs {env.get('tensorrt')}"
    if record.get("gpu") != env.get("gpu") or record.get("compute_capability") != env.get("compute_capability"):
        return (f"built for {record.get('gpu')} (sm {record.get('compute_capability')}), this machine has "
                f"{env.get('gpu')} (sm {env.get('compute_capability')})")
    if flags is not None and record.get("flags") != flags:
        return f"built with builder flags {record.get('flags')}, asked for {flags}"
    weights = weights_sha256(m)
    if record.get("weights_sha256") != weights:
        return f"the bundle's weights file {(m.get('weights') or {}).get('file')} changed since the engines were built"
    graphs = record.get("graphs") or {}
    for name, spec in bundle.graphs.items():
        g = graphs.get(name)
        if not isinstance(g, dict):
            return f"no engine for the {name} graph"
        onnx_sha = file_sha256(m, spec_file(m, name, spec))
        if g.get("onnx_sha256") != onnx_sha:
            return f"the bundle's {spec_file(m, name, spec)} changed since its engine was built"
        plan = engines_dir / str(g.get("plan") or f"{name}.plan")
        if not plan.is_file():
            return f"{plan} is missing"
        profile = graph_profile(bundle, name)
        if g.get("profile") != profile_json(profile):
            return f"the {name} engine's profile {g.get('profile')} is not the bundle's {profile_json(profile)}"
        key = engine_cache_key(str(onnx_sha), weights, env.get("tensorrt", ""), env.get("gpu", ""),
                               env.get("compute_capability", ""), profile, str(record.get("precision")),
                               record.get("flags") or {})
        if g.get("cache_key") != key:
            return f"the {name} engine's cache key {g.get('cache_key')} is not {key} (build.json edited or mixed up)"
    return None


def spec_file(manifest: dict[str, Any], name: str, spec: GraphSpec) -> str:
    return str(manifest["graphs"][name].get("file") or spec.file)


def decide(problem: str | None, building: bool, force: bool = False) -> tuple[str, str]:
    """('use' | 'rebuild' | 'refuse', the reason shown to the user)."""
    if force and building:
        return "rebuild", "--force given"
    if problem is None:
        return "use", "engines match the bundle, TensorRT version and GPU"
    return ("rebuild" if building else "refuse"), problem


# ----------------------------------------------------------------------------------------------- GPU facts
def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` as {gpu, compute_capability}."""
    rows = []
    for line in text.strip().splitlines():
        name, _, cc = line.rpartition(",")
        if name.strip() and cc.strip():
            rows.append({"gpu": name.strip(), "compute_capability": cc.strip()})
    return rows


def gpu_facts(index: int) -> dict[str, str]:
    """Name and compute capability of CUDA device `index` (the CUDA driver's numbering, which honours
    CUDA_VISIBLE_DEVICES as TensorRT does), read through the driver library, else nvidia-smi."""
    try:
        return _driver_gpu_facts(index)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EngineError("cannot read the GPU's name: neither libcuda nor nvidia-smi is available")
    try:
        done = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"nvidia-smi failed: {exc}") from None
    rows = parse_nvidia_smi(done.stdout)
    if index >= len(rows):
        raise EngineError(f"cuda:{index}: nvidia-smi lists {len(rows)} GPU(s)")
    return rows[index]


def _driver_gpu_facts(index: int) -> dict[str, str]:
    lib = ctypes.CDLL("libcuda.so.1")

    def check(rc: int, call: str) -> None:
        if rc != 0:
            raise EngineError(f"CUDA driver call {call} failed with error {rc} (GPU cuda:{index})")

    check(lib.cuInit(0), "cuInit")
    count = ctypes.c_int()
    check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if not 0 <= index < count.value:
        raise EngineError(f"cuda:{index} does not exist: {count.value} CUDA device(s) visible")
    device = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device), "cuDeviceGetAttribute")  # CC major
    check(lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device), "cuDeviceGetAttribute")  # CC minor
    return {"gpu": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def environment(index: int = 0, trt: Any = None) -> dict[str, str]:
    """What a plan must match here: the TensorRT version and GPU `index`'s name and compute capability."""
    if trt is None:
        import tensorrt as trt
    return {"tensorrt": str(trt.__version__), **gpu_facts(index)}


def set_device(index: int) -> None:
    """Make CUDA device `index` current for this thread (TensorRT and cudaMalloc use the current device)."""
    from polygraphy import cuda

    try:
        cudart = cuda.wrapper().handle
    except OSError as exc:
        raise MissingDependencyError(f"the CUDA runtime library (libcudart) cannot be loaded ({exc}): install the "
                                     "CUDA toolkit or pip install nvidia-cuda-runtime-cu12 (cu13 for CUDA 13)") \
            from None
    rc = cudart.cudaSetDevice(ctypes.c_int(index))
    if rc != 0:
        raise EngineError(f"cannot select cuda:{index} (CUDA error {rc})")


# ----------------------------------------------------------------------------------------------- availability
def unavailable(bundle: Any, engines_dir: Path | None, device: str = "cuda:0") -> str | None:
    """Why TensorRT cannot run this bundle here, or None. Cheap: TensorRT is imported (for its version) only when
    the engine folder has a build.json, and no CUDA context is created."""
    folder = engines_dir or default_engines_dir(bundle)
    if not installed("tensorrt"):
        return f"tensorrt is not installed ({TRT_HINT})"
    if not installed("polygraphy"):
        return "polygraphy is not installed (pip install 'noop-rt[tensorrt]')"
    if not nvidia_gpus():
        return "no NVIDIA GPU"
    record = read_record(folder)
    if record is None:
        return plan_problem(None, {}, bundle, folder)
    try:
        env = environment(cuda_index(device) if device.startswith("cuda") else 0)
    except (ImportError, OSError, EngineError) as exc:
        return f"cannot read the TensorRT version or GPU: {exc}"
    return plan_problem(record, env, bundle, folder)


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


# ----------------------------------------------------------------------------------------------- CUDA graphs
G = TypeVar("G")


def buffer_addresses(buffers: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """(tensor name, device address) of an engine's bound buffers, sorted: what a captured graph has baked in."""
    return tuple(sorted((name, int(buf.ptr)) for name, buf in buffers.items()))


class GraphCache(Generic[G]):
    """An engine's captured CUDA graphs by input signature, valid for one set of buffer addresses: when any buffer
    moved (it grew for a larger call), every graph captured on the old addresses is freed and forgotten."""

    def __init__(self, limit: int, free: Callable[[G], None]) -> None:
        self.cache: ShapeCache[G] = ShapeCache(limit, evict=False, close=free)
        self.addresses: tuple[tuple[str, int], ...] | None = None

    def lookup(self, key: Any, addresses: tuple[tuple[str, int], ...]) -> G | None:
        if addresses != self.addresses:
            self.cache.clear()
            self.addresses = addresses
        return self.cache.lookup(key)

    def try_add(self, key: Any, build: Callable[[], G]) -> G | None:
        """A graph for `key` on the addresses of the last `lookup`; None when full or the capture failed."""
        return self.cache.try_add(key, build)

    def failure(self, key: Any) -> str | None:
        return self.cache.failures.get(key)

    def clear(self) -> None:
        self.cache.clear()
        self.addresses = None


def _cudart() -> Any:  # pragma: no cover - needs the CUDA runtime: not run here
    from polygraphy import cuda

    return cuda.wrapper().handle


class _CudaGraph:  # pragma: no cover - needs TensorRT and a GPU: not run here
    """One `execute_async_v3` of an execution context, captured on `stream_ptr` and instantiated."""

    def __init__(self, context: Any, stream_ptr: int) -> None:
        cudart = _cudart()
        stream = ctypes.c_void_p(stream_ptr)
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        _cuda_check(cudart.cudaStreamBeginCapture(stream, ctypes.c_int(CAPTURE_MODE_THREAD_LOCAL)),
                    "cudaStreamBeginCapture")
        try:
            ok = context.execute_async_v3(stream_ptr)
        finally:  # always end the capture, or the stream stays unusable
            ended = cudart.cudaStreamEndCapture(stream, ctypes.byref(self.graph))
        if not ok:
            self.free()
            raise EngineError("TensorRT execution failed while capturing a CUDA graph")
        _cuda_check(ended, "cudaStreamEndCapture")
        rc = cudart.cudaGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0))
        if rc != 0:
            self.free()
            _cuda_check(rc, "cudaGraphInstantiateWithFlags")

    def launch(self, stream_ptr: int) -> None:
        _cuda_check(_cudart().cudaGraphLaunch(self.exec, ctypes.c_void_p(stream_ptr)), "cudaGraphLaunch")

    def free(self) -> None:
        cudart = _cudart()
        if self.exec.value:
            cudart.cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph.value:
            cudart.cudaGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()


def _cuda_check(rc: int, call: str) -> None:
    if rc != 0:
        raise EngineError(f"CUDA runtime call {call} failed with error {rc}")


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


class TensorRTRunner:
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

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
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
