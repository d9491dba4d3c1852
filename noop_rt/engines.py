"""`noop-rt build`: TensorRT FP16 engines for a bundle, and the TensorRT runtime backend.

Written for users who have TensorRT (>= 10) and an NVIDIA GPU. It has NOT been run in this project: TensorRT cannot be
installed on any of its machines (see README "Deployment targets"). So the TensorRT calls are kept thin (Polygraphy's
documented Python API, imported lazily) and everything around them is pure and unit-tested: profiles, cache keys,
the use/rebuild/refuse decision, and parsing of the built engine's layer precisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noop_rt.bundle import MANIFEST, Bundle, sha256_file, write_json_atomic
from noop_rt.errors import EngineError, MissingDependencyError, ValidationFailedError
from noop_rt.runtime.base import GraphBackend

FORMAT = "noop-rt.engines"
VERSION = 1
BUILD_JSON = "build.json"
TRT_HINT = ("TensorRT and an NVIDIA GPU are required: pip install 'noop-rt[tensorrt]' (tensorrt from NVIDIA's "
            "index, https://pypi.nvidia.com) on a machine with a CUDA GPU and driver")
# Layers that do the arithmetic: an FP16 engine must run (most of) these in half precision.
COMPUTE_LAYER_HINTS = ("conv", "matmul", "gemm", "fullyconnected", "myelin", "attention", "mha")


# ----------------------------------------------------------------------------------------------- pure helpers
def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str,
                     profile: dict[str, Any], precision: str, flags: dict[str, Any]) -> str:
    """What a plan depends on: the ONNX bytes, TensorRT version, GPU, profile shapes, precision and builder flags."""
    blob = json.dumps({"onnx": onnx_sha256, "trt": trt_version, "gpu": gpu_name, "cc": compute_capability,
                       "profile": _jsonable(profile), "precision": precision, "flags": flags}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _jsonable(profile: dict[str, Any]) -> dict[str, list[list[int]]]:
    return {k: [list(s) for s in v] for k, v in profile.items()}


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def builder_flags(trt_version: str, optimization_level: int) -> dict[str, Any]:
    """TensorRT >= 11 builds strongly typed networks only (the FP16 ONNX graph fixes each tensor's type; the FP16
    builder flag is gone); on 10.x the network is weakly typed and the FP16 builder flag lets it pick half kernels."""
    strongly_typed = trt_major(trt_version) >= 11
    return {"strongly_typed": strongly_typed, "fp16_flag": not strongly_typed,
            "builder_optimization_level": optimization_level}


def graph_profile(bundle: Bundle, name: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The optimisation profile of one bundle graph: batch 1 / C (the text encoder: C prompts; the UNet: one image's
    C classes; the image graphs: C images) / the bundle's max batch (images per batch x C)."""
    max_batch, opt = int(bundle.manifest["max_batch"]), int(bundle.manifest["opt_batch"])
    return bundle.graphs[name].profile(opt if name != "text_encoder" else len(bundle.classes), max_batch)


def plan_problem(record: dict[str, Any] | None, env: dict[str, str], bundle: Bundle, engines_dir: Path,
                 flags: dict[str, Any] | None = None) -> str | None:
    """None when the plans in `engines_dir` may be loaded for `bundle` on this machine, else the reason they may not.
    A pure function of build.json, the running environment and the bundle manifest. `flags`: the builder flags a
    build asks for (a plan built with other flags is rebuilt); None at run time (any flags will do)."""
    if record is None:
        return f"no engines in {engines_dir} (run: noop-rt build {bundle.root})"
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        return f"{engines_dir}/{BUILD_JSON} is of another format or version"
    if record.get("tensorrt") != env.get("tensorrt"):
        return f"built with TensorRT {record.get('tensorrt')}, this machine runs {env.get('tensorrt')}"
    if record.get("gpu") != env.get("gpu") or record.get("compute_capability") != env.get("compute_capability"):
        return (f"built for {record.get('gpu')} (sm {record.get('compute_capability')}), this machine has "
                f"{env.get('gpu')} (sm {env.get('compute_capability')})")
    if record.get("precision") != bundle.manifest.get("precision"):
        return f"built {record.get('precision')} engines, the bundle is {bundle.manifest.get('precision')}"
    if flags is not None and record.get("flags") != flags:
        return f"built with builder flags {record.get('flags')}, asked for {flags}"
    want_max = int(bundle.manifest["max_batch"])
    graphs = record.get("graphs", {})
    for name in bundle.graphs:
        g = graphs.get(name)
        if g is None:
            return f"no engine for the {name} graph"
        if g.get("onnx_sha256") != bundle.manifest["files"].get(bundle.graphs[name].file):
            return f"the bundle's {bundle.graphs[name].file} changed since the engine was built"
        if not (engines_dir / g.get("plan", "")).is_file():
            return f"{engines_dir / g.get('plan', name + '.plan')} is missing"
        if g.get("max_batch") != want_max:
            return f"{name} engine profile max batch {g.get('max_batch')} != {want_max}"
        profile = graph_profile(bundle, name)
        if g.get("profile") != _jsonable(profile):
            return f"{name} engine profile {g.get('profile')} != the bundle's {_jsonable(profile)}"
        key = engine_cache_key(g["onnx_sha256"], env.get("tensorrt", ""), env.get("gpu", ""),
                               env.get("compute_capability", ""), profile, str(record.get("precision")),
                               record.get("flags") or {})
        if g.get("cache_key") != key:
            return f"{name} engine cache key {g.get('cache_key')} != {key} (build.json edited or from another build)"
    return None


def decide(problem: str | None, building: bool, force: bool = False) -> tuple[str, str]:
    """('use' | 'rebuild' | 'refuse', reason shown to the user)."""
    if force and building:
        return "rebuild", "--force given"
    if problem is None:
        return "use", "engines match the bundle, TensorRT version and GPU"
    return ("rebuild" if building else "refuse"), problem


def datatype_of(format_string: str) -> str:
    """The datatype named in a TensorRT layer-information 'Format/Datatype' string."""
    s = format_string.lower()
    for needle, name in (("fp16", "fp16"), ("half", "fp16"), ("bf16", "bf16"), ("fp8", "fp8"), ("int8", "int8"),
                         ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool")):
        if needle in s:
            return name
    return "other"


def precision_report(engine_info: dict[str, Any]) -> dict[str, Any]:
    """Count compute layers by output datatype in an engine inspector JSON (ProfilingVerbosity.DETAILED)."""
    counts: dict[str, int] = {}
    compute = 0
    for layer in engine_info.get("Layers", []):
        if isinstance(layer, str):  # non-detailed verbosity gives names only
            continue
        kind = f"{layer.get('LayerType', '')} {layer.get('Name', '')}".lower()
        if not any(h in kind for h in COMPUTE_LAYER_HINTS):
            continue
        outputs = layer.get("Outputs") or [{}]
        dtype = datatype_of(str(outputs[0].get("Format/Datatype", "")))
        counts[dtype] = counts.get(dtype, 0) + 1
        compute += 1
    half = counts.get("fp16", 0) + counts.get("bf16", 0)
    return {"compute_layers": compute, "by_datatype": counts, "half_fraction": half / compute if compute else 0.0}


def is_half_engine(report: dict[str, Any], min_fraction: float = 0.5) -> bool:
    """An FP16 build must run at least `min_fraction` of its compute layers in half precision."""
    return report["compute_layers"] > 0 and report["half_fraction"] >= min_fraction


# ----------------------------------------------------------------------------------------------- environment
def tensorrt_status() -> tuple[Any | None, str | None]:
    """(the tensorrt module, None) when TensorRT imports and a CUDA GPU is visible, else (None, reason)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, TRT_HINT
    if not torch.cuda.is_available():
        return None, "no CUDA GPU visible; " + TRT_HINT
    return trt, None


def environment(trt: Any) -> dict[str, str]:
    props = torch.cuda.get_device_properties(0)
    return {"tensorrt": str(trt.__version__), "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def read_record(engines_dir: Path) -> dict[str, Any] | None:
    path = engines_dir / BUILD_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def default_engines_dir(bundle: Bundle) -> Path:
    return Path("engines") / bundle.root.name


# ----------------------------------------------------------------------------------------------- build (TensorRT)
@dataclass
class BuildOptions:
    out: Path | None = None
    timing_cache: Path | None = None
    optimization_level: int = 3
    force: bool = False
    min_half_fraction: float = 0.5


def build_engines(bundle_dir: str | Path, options: BuildOptions, log: Any = sys.stderr) -> dict[str, Any]:
    """Build one FP16 plan per bundle graph with Polygraphy; verify layer precisions; write build.json."""
    trt, why = tensorrt_status()
    if trt is None:
        raise MissingDependencyError(why)
    bundle = Bundle.open(bundle_dir)
    if bundle.manifest["precision"] != "fp16":
        raise EngineError(f"{bundle.root} is an fp32 bundle; TensorRT FP16 engines need an fp16 graph "
                          f"(strongly typed): re-export with noop-rt export --ckpt … --fp16")
    out = options.out or default_engines_dir(bundle)
    env = environment(trt)
    flags = builder_flags(env["tensorrt"], options.optimization_level)
    action, reason = decide(plan_problem(read_record(out), env, bundle, out, flags), building=True,
                            force=options.force)
    if action == "use":
        print(f"found cached engines {out}: {reason} (use --force to rebuild)", file=log)
        return read_record(out) or {}
    print(f"building TensorRT engines into {out}: {reason}", file=log)
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )

    timing_cache = options.timing_cache or out.parent / "timing.cache"
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    max_batch, opt = int(bundle.manifest["max_batch"]), int(bundle.manifest["opt_batch"])
    tmp = out.parent / f".{out.name}.build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record: dict[str, Any] = {"format": FORMAT, "version": VERSION, **env, "precision": "fp16", "flags": flags,
                              "bundle": str(bundle.root), "bundle_manifest_sha256": sha256_file(bundle.root / MANIFEST),
                              "timing_cache": str(timing_cache), "graphs": {},
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        for name, spec in bundle.graphs.items():
            profile_shapes = graph_profile(bundle, name)
            profile = Profile()
            for tensor, (lo, mid, hi) in profile_shapes.items():
                profile.add(tensor, min=lo, opt=mid, max=hi)
            t0 = time.perf_counter()
            print(f"  building {name} (profile batch 1/{opt}/{max_batch}) …", file=log, flush=True)
            network = NetworkFromOnnxPath(str(bundle.path(name)), strongly_typed=flags["strongly_typed"])
            config = CreateConfig(profiles=[profile], fp16=flags["fp16_flag"],
                                  load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
                                  builder_optimization_level=options.optimization_level,
                                  profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
            engine = EngineFromNetwork(network, config, save_timing_cache=str(timing_cache))()
            plan = tmp / f"{name}.plan"
            plan.write_bytes(engine.serialize())
            inspector = engine.create_engine_inspector()
            info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
            report = precision_report(info)
            record["graphs"][name] = {
                "plan": plan.name, "onnx_sha256": bundle.manifest["files"][spec.file],
                "profile": _jsonable(profile_shapes), "max_batch": max_batch, "precision_report": report,
                "cache_key": engine_cache_key(bundle.manifest["files"][spec.file], env["tensorrt"], env["gpu"],
                                              env["compute_capability"], profile_shapes, "fp16", flags),
                "build_seconds": round(time.perf_counter() - t0, 1)}
            mark = "✓" if is_half_engine(report, options.min_half_fraction) else "✗"
            print(f"  {mark} {name}: {100 * report['half_fraction']:.0f} % of {report['compute_layers']} compute "
                  f"layers in half precision ({time.perf_counter() - t0:.0f} s)", file=log)
        write_json_atomic(tmp / BUILD_JSON, record)
        bad = [n for n, g in record["graphs"].items()
               if not is_half_engine(g["precision_report"], options.min_half_fraction)]
        if bad:
            raise ValidationFailedError(f"engine(s) {', '.join(bad)} came out FP32, not FP16; nothing was written")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------------------- runtime (TensorRT)
class TensorRTBackend(GraphBackend):
    """Deserialise each plan once; device buffers per shape, allocated once; one CUDA stream; tensors stay on the
    GPU between the noise graph and the UNet (they are torch CUDA tensors). Not run here (no TensorRT)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, engines_dir: Path, trt: Any) -> None:
        from transformers import CLIPTokenizer

        from noop_rt.backbone import quiet_libraries

        quiet_libraries()
        self.trt = trt
        self.bundle = bundle
        m = bundle.manifest
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        self.contexts = {}
        for name in bundle.graphs:
            engine = self.runtime.deserialize_cuda_engine((engines_dir / f"{name}.plan").read_bytes())
            if engine is None:
                raise EngineError(f"TensorRT could not deserialize {engines_dir / name}.plan; rebuild it")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[tuple[str, str, tuple[int, ...]], torch.Tensor] = {}
        self.specs = bundle.graphs
        self.device = f"cuda:0 ({torch.cuda.get_device_name(0)})"
        self.torch_device = torch.device("cuda")
        self.resolution = int(m["resolution"])
        self.latent_shape = tuple(m["latent_shape"])
        self.alphas_cumprod = torch.tensor(m["alphas_cumprod"], dtype=torch.float32)
        self.prediction_type = m["backbone"]["prediction_type"]
        self.max_tokens = int(m["max_tokens"])
        self.has_noise = True
        self.tokenizer = CLIPTokenizer.from_pretrained(bundle.root / "tokenizer")

    def _buffer(self, graph: str, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (graph, name, shape)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device="cuda")
        return self.buffers[key]

    def _infer(self, graph: str, **inputs: torch.Tensor) -> torch.Tensor:
        spec, ctx = self.specs[graph], self.contexts[graph]
        dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
        batch = next(iter(inputs.values())).shape[0]
        for t in spec.inputs:
            buf = self._buffer(graph, t.name, t.concrete(batch), dtypes[t.dtype])
            buf.copy_(inputs[t.name], non_blocking=True)  # a no-op transfer for on-device (CUDA) inputs
            ctx.set_input_shape(t.name, tuple(buf.shape))
            ctx.set_tensor_address(t.name, buf.data_ptr())
        out_spec = spec.outputs[0]
        out = self._buffer(graph, out_spec.name, out_spec.concrete(batch), dtypes[out_spec.dtype])
        ctx.set_tensor_address(out_spec.name, out.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"TensorRT execution of {graph} failed")
        return out.to(torch.float32, copy=True)  # a new tensor: the shared buffer is reused by the next call

    def _call(self, graph: str, **inputs: torch.Tensor) -> torch.Tensor:
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # inputs written by torch on the caller's stream
        with torch.cuda.stream(self.stream):
            out = self._infer(graph, **inputs)
        caller.wait_stream(self.stream)  # the scoring math runs on the caller's stream
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()


def open_tensorrt_backend(bundle: Bundle, required: bool, engines_dir: Path | None = None,
                          log: Any = sys.stderr) -> TensorRTBackend | None:
    """The TensorRT backend when TensorRT imports, a GPU is present and matching engines exist; else None
    (auto) or an error naming what is missing (--backend tensorrt)."""
    trt, why = tensorrt_status()
    engines_dir = engines_dir or default_engines_dir(bundle)
    if trt is None:
        if required:
            raise MissingDependencyError(why)
        return None
    action, reason = decide(plan_problem(read_record(engines_dir), environment(trt), bundle, engines_dir),
                            building=False)
    if action != "use":
        if required:
            raise EngineError(f"cannot use the TensorRT engines: {reason} (run noop-rt build {bundle.root})")
        if (engines_dir / BUILD_JSON).is_file():
            print(f"note: TensorRT engines in {engines_dir} not used: {reason}", file=log)
        return None
    return TensorRTBackend(bundle, engines_dir, trt)
