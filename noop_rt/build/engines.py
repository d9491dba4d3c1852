"""`noop-rt build`: one TensorRT FP16 plan per graph of an fp16 bundle (format 2), with build.json beside them.

Written for users who have TensorRT (>= 10), Polygraphy and an NVIDIA GPU. It has NOT been run in this project:
TensorRT cannot be installed on any of its machines. So the TensorRT calls are kept thin (Polygraphy's documented
Python API, imported lazily; no torch) and everything around them is pure and unit-tested: profiles, cache keys and
the use/rebuild/refuse decision (shared with the runtime, in `runtime/backends/tensorrt_plans.py`), builder flags per
TensorRT major, the parsing of the built engine's layer precisions, and the profile given to each network.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noop_rt.runtime.backends.base import cuda_index, installed, nvidia_gpus
from noop_rt.runtime.backends.tensorrt_plans import (
    BUILD_JSON,
    FORMAT,
    TRT_HINT,
    VERSION,
    Profile,
    axis_ranges,
    decide,
    default_engines_dir,
    engine_cache_key,
    environment,
    file_sha256,
    graph_profile,
    plan_problem,
    profile_json,
    read_record,
    set_device,
    spec_file,
    weights_sha256,
)
from noop_rt.runtime.bundle import MANIFEST, Bundle, sha256_file, write_json_atomic
from noop_rt.runtime.errors import EngineError, MissingDependencyError, ValidationFailedError

__all__ = ["BUILD_JSON", "FORMAT", "VERSION", "BuildOptions", "axis_ranges", "build_engines", "builder_flags",
           "datatype_of", "decide", "engine_cache_key", "graph_profile", "is_half_engine", "network_profile",
           "plan_problem", "precision_report", "tensorrt_status"]

# Layers that do the arithmetic: an FP16 engine must run (most of) these in half precision.
COMPUTE_LAYER_HINTS = ("conv", "matmul", "gemm", "fullyconnected", "myelin", "attention", "mha")


# ----------------------------------------------------------------------------------------------- pure helpers
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


def network_profile(profile: Profile, network_inputs: list[str], graph: str) -> Profile:
    """The part of a graph's profile that applies to the parsed network's inputs. TensorRT's ONNX parser turns an
    input that has an initializer (the classifier's class embeddings) into weights, so it drops out; a network input
    without a profile is an error."""
    missing = [name for name in network_inputs if name not in profile]
    if missing:
        raise EngineError(f"the {graph} graph has input(s) {', '.join(missing)} that its description does not "
                          "list; re-export the bundle with this noop-rt")
    return {name: shapes for name, shapes in profile.items() if name in network_inputs}


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
    """(the tensorrt module, None) when TensorRT and Polygraphy import and an NVIDIA GPU is present, else
    (None, reason)."""
    if not installed("tensorrt"):
        return None, TRT_HINT
    if not installed("polygraphy"):
        return None, "polygraphy is not installed; " + TRT_HINT
    if not nvidia_gpus():
        return None, "no NVIDIA GPU visible; " + TRT_HINT
    try:
        import tensorrt as trt
    except ImportError as exc:
        return None, f"tensorrt does not import ({exc}); " + TRT_HINT
    return trt, None


# ----------------------------------------------------------------------------------------------- build (TensorRT)
@dataclass
class BuildOptions:
    out: Path | None = None
    timing_cache: Path | None = None
    optimization_level: int = 3
    force: bool = False
    min_half_fraction: float = 0.5
    device: str = "cuda:0"


def build_engines(bundle_dir: str | Path, options: BuildOptions, log: Any = sys.stderr) -> dict[str, Any]:
    """Verify the bundle (every sha256), build one FP16 plan per graph with Polygraphy, check each plan's layer
    precisions, write build.json; the engine folder appears complete or not at all. Returns the build record."""
    bundle = Bundle.open(bundle_dir, verify="all")
    precision = bundle.manifest.get("precision")
    if precision != "fp16":
        raise EngineError(f"{bundle.root} is an {precision} bundle; TensorRT FP16 engines are built from an fp16 "
                          "bundle (strongly typed): re-export with noop-rt export --ckpt NAME.pt --fp16")
    trt, why = tensorrt_status()
    if trt is None:
        raise MissingDependencyError(why)
    index = cuda_index(options.device)
    env = environment(index, trt)
    out = options.out or default_engines_dir(bundle)
    flags = builder_flags(env["tensorrt"], options.optimization_level)
    action, reason = decide(plan_problem(read_record(out), env, bundle, out, flags), building=True,
                            force=options.force)
    if action == "use":
        print(f"found cached engines {out}: {reason} (use --force to rebuild)", file=log)
        return read_record(out) or {}
    print(f"building TensorRT engines into {out} on cuda:{index} ({env['gpu']}, TensorRT {env['tensorrt']}): "
          f"{reason}", file=log)
    set_device(index)
    timing_cache = options.timing_cache or out.parent / "timing.cache"
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = bundle.manifest
    record: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, **env, "precision": "fp16", "flags": flags, "bundle": str(bundle.root),
        "bundle_cache_key": m.get("cache_key"), "bundle_manifest_sha256": sha256_file(bundle.root / MANIFEST),
        "weights_file": (m.get("weights") or {}).get("file"), "weights_sha256": weights_sha256(m),
        "timing_cache": str(timing_cache), "graphs": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from polygraphy.exception import PolygraphyException

    try:
        for name, spec in bundle.graphs.items():
            try:
                record["graphs"][name] = _build_graph(trt, bundle, name, spec_file(m, name, spec), env, flags, tmp,
                                                      timing_cache, options, log)
            except PolygraphyException as exc:  # parse or build failures, reported by Polygraphy's logger
                raise EngineError(f"TensorRT could not build the {name} engine: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
        bad = [n for n, g in record["graphs"].items()
               if not is_half_engine(g["precision_report"], options.min_half_fraction)]
        if bad:
            raise ValidationFailedError(f"engine(s) {', '.join(bad)} came out FP32, not FP16 (under "
                                        f"{100 * options.min_half_fraction:.0f} % of compute layers in half "
                                        "precision); nothing was written")
        write_json_atomic(tmp / BUILD_JSON, record)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _build_graph(trt: Any, bundle: Bundle, name: str, file: str, env: dict[str, str], flags: dict[str, Any],
                 tmp: Path, timing_cache: Path, options: BuildOptions, log: Any) -> dict[str, Any]:
    """Build one plan into `tmp`; its build.json entry."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath
    from polygraphy.backend.trt import Profile as PolyProfile

    profile = graph_profile(bundle, name)
    t0 = time.perf_counter()
    print(f"  building {name} ({', '.join(f'{k} {v}' for k, v in axis_ranges(bundle.manifest, name).items())}) …",
          file=log, flush=True)
    builder, network, parser = NetworkFromOnnxPath(str(bundle.root / file),
                                                   strongly_typed=flags["strongly_typed"])()
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    poly = PolyProfile()
    for tensor, (lo, opt, hi) in network_profile(profile, inputs, name).items():
        poly.add(tensor, min=lo, opt=opt, max=hi)
    config = CreateConfig(profiles=[poly], fp16=flags["fp16_flag"],
                          load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
                          builder_optimization_level=options.optimization_level,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    cache_tmp = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.tmp")
    engine = EngineFromNetwork((builder, network, parser), config, save_timing_cache=str(cache_tmp))()
    if engine is None:
        raise EngineError(f"TensorRT could not build the {name} engine (see its log above)")
    if cache_tmp.is_file():
        cache_tmp.replace(timing_cache)  # the timing cache is replaced whole, never half-written
    plan = tmp / f"{name}.plan"
    plan.write_bytes(engine.serialize())
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    report = precision_report(info)
    onnx_sha = file_sha256(bundle.manifest, file)
    mark = "✓" if is_half_engine(report, options.min_half_fraction) else "✗"
    print(f"  {mark} {name}: {100 * report['half_fraction']:.0f} % of {report['compute_layers']} compute layers in "
          f"half precision ({time.perf_counter() - t0:.0f} s)", file=log)
    return {"plan": plan.name, "onnx": file, "onnx_sha256": onnx_sha, "profile": profile_json(profile),
            "engine_inputs": inputs, "precision_report": report,
            "cache_key": engine_cache_key(str(onnx_sha), weights_sha256(bundle.manifest), env["tensorrt"], env["gpu"],
                                          env["compute_capability"], profile, "fp16", flags),
            "build_seconds": round(time.perf_counter() - t0, 1)}


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing an old one (kept aside until the move succeeded)."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
