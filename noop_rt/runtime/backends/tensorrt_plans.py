"""TensorRT plans: what a plan is built for and whether one may be used here, without importing TensorRT.

The optimisation profiles per graph (from the bundle's graph descriptions), the engine cache key, `build.json` (the
record of a build), the use/rebuild/refuse decision (`plan_problem`, `decide`), the GPU's facts read from the driver,
and `unavailable`: why the TensorRT backend cannot run a bundle here. Pure functions, unit-tested without TensorRT;
`noop_rt/build/engines.py` builds plans against this contract and `tensorrt_runner.py` loads them.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from noop_rt.runtime.backends.base import cuda_index, installed, nvidia_gpus
from noop_rt.runtime.errors import EngineError, MissingDependencyError
from noop_rt.runtime.extras import install_hint
from noop_rt.runtime.graph_specs import BATCH, CLASSES, PROMPTS, SCORER, TEXT_ENCODER, GraphSpec

FORMAT = "noop-rt.engines"
VERSION = 2  # 2: bundle format 2 (graphs + one weights file), profiles per named axis
BUILD_JSON = "build.json"
TRT_HINT = (f"TensorRT and an NVIDIA GPU are required: {install_hint('tensorrt')} (tensorrt from NVIDIA's index, "
            "https://pypi.nvidia.com, and polygraphy) on a machine with a CUDA GPU and driver")
TEXT_ENCODER_MAX_PROMPTS = 64  # GraphModel.embed sends at most this many prompts per call
Profile = dict[str, tuple[tuple[int, ...], ...]]  # input name -> (min shape, opt shape, max shape)


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
        return f"polygraphy is not installed ({install_hint('tensorrt')})"
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


