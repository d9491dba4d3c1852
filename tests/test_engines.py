"""TensorRT path: everything around TensorRT is pure and tested here; TensorRT itself cannot be installed on this
project's machines, so the tests that need it skip with that reason."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from noop_rt.bundle import Bundle
from noop_rt.cli import app
from noop_rt.engines import (
    BUILD_JSON,
    FORMAT,
    VERSION,
    builder_flags,
    datatype_of,
    decide,
    engine_cache_key,
    graph_profile,
    is_half_engine,
    plan_problem,
    precision_report,
    tensorrt_status,
)
from noop_rt.graphs import graph_specs

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
NO_TRT = "TensorRT + an NVIDIA GPU needed (TensorRT cannot be installed on this project's machines)"
ENV = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


FLAGS = builder_flags(ENV["tensorrt"], 3)


def make_record(bundle: Bundle, tmp_path) -> dict:
    """A build.json as `build_engines` writes it (same helpers), with stand-in plan files."""
    graphs = {}
    precision = bundle.manifest["precision"]
    for name, spec in bundle.graphs.items():
        (tmp_path / f"{name}.plan").write_bytes(b"plan")
        sha = bundle.manifest["files"][spec.file]
        profile = graph_profile(bundle, name)
        graphs[name] = {"plan": f"{name}.plan", "onnx_sha256": sha, "max_batch": bundle.manifest["max_batch"],
                        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                        "cache_key": engine_cache_key(sha, ENV["tensorrt"], ENV["gpu"], ENV["compute_capability"],
                                                      profile, precision, FLAGS)}
    return {"format": FORMAT, "version": VERSION, **ENV, "precision": precision, "flags": FLAGS, "graphs": graphs}


def test_plan_decision_covers_every_staleness_reason(tiny_bundle, tmp_path) -> None:
    bundle = Bundle.open(tiny_bundle)
    record = make_record(bundle, tmp_path)
    assert plan_problem(record, ENV, bundle, tmp_path) is None
    assert plan_problem(record, ENV, bundle, tmp_path, FLAGS) is None
    assert decide(None, building=True) == ("use", "engines match the bundle, TensorRT version and GPU")
    assert decide(None, building=True, force=True)[0] == "rebuild"

    def problem(mutate, env=ENV) -> str:
        r = copy.deepcopy(record)
        mutate(r)
        reason = plan_problem(r, env, bundle, tmp_path)
        assert reason is not None
        assert decide(reason, building=True) == ("rebuild", reason)
        assert decide(reason, building=False) == ("refuse", reason)
        return reason

    assert "no engines" in plan_problem(None, ENV, bundle, tmp_path)
    assert "TensorRT 10.12.0" in problem(lambda r: r.update(tensorrt="10.12.0"))
    assert "sm 8.9" in problem(lambda r: r.update(gpu="NVIDIA L4", compute_capability="8.9"))
    assert "changed since" in problem(lambda r: r["graphs"]["unet"].update(onnx_sha256="0" * 64))
    assert "no engine for the noise graph" in problem(lambda r: r["graphs"].pop("noise"))
    assert "max batch" in problem(lambda r: r["graphs"]["unet"].update(max_batch=1))
    assert "fp16" in problem(lambda r: r.update(precision="fp16"))
    assert "another format" in problem(lambda r: r.update(version=0))
    assert "profile" in problem(lambda r: r["graphs"]["unet"]["profile"]["sample"][1].__setitem__(0, 999))
    assert "cache key" in problem(lambda r: r["graphs"]["text_encoder"].update(cache_key="0" * 24))
    reason = plan_problem(record, ENV, bundle, tmp_path, builder_flags(ENV["tensorrt"], 5))
    assert reason is not None and "builder flags" in reason  # `build --optimization-level 5` rebuilds
    assert decide(reason, building=True)[0] == "rebuild"
    (tmp_path / "unet.plan").unlink()
    assert "missing" in plan_problem(record, ENV, bundle, tmp_path)


def test_cache_key_changes_with_every_input() -> None:
    profile = {"sample": ((1, 4, 64, 64), (37, 4, 64, 64), (148, 4, 64, 64))}
    flags = builder_flags("10.13.0", 3)
    base = engine_cache_key("a" * 64, "10.13.0", "H100", "9.0", profile, "fp16", flags)
    variants = [
        engine_cache_key("b" * 64, "10.13.0", "H100", "9.0", profile, "fp16", flags),
        engine_cache_key("a" * 64, "11.0.0", "H100", "9.0", profile, "fp16", flags),
        engine_cache_key("a" * 64, "10.13.0", "L4", "8.9", profile, "fp16", flags),
        engine_cache_key("a" * 64, "10.13.0", "H100", "9.0", {"sample": profile["sample"][:2] * 1 + ((74, 4, 64, 64),)},
                         "fp16", flags),
        engine_cache_key("a" * 64, "10.13.0", "H100", "9.0", profile, "fp16", builder_flags("10.13.0", 5)),
    ]
    assert len({base, *variants}) == 6
    assert base == engine_cache_key("a" * 64, "10.13.0", "H100", "9.0", profile, "fp16", flags)


def test_builder_flags_follow_the_tensorrt_major() -> None:
    assert builder_flags("11.0.1", 3) == {"strongly_typed": True, "fp16_flag": False, "builder_optimization_level": 3}
    assert builder_flags("10.13.0", 4)["fp16_flag"] is True
    assert builder_flags("10.13.0", 4)["strongly_typed"] is False


def test_precision_report_catches_an_fp32_engine() -> None:
    def layer(kind: str, fmt: str) -> dict:
        return {"Name": kind.lower() + "_1", "LayerType": kind, "Outputs": [{"Format/Datatype": fmt}]}

    half = {"Layers": [layer("CaskConvolution", "Channel major FP16 format where channel % 8 == 0"),
                       layer("CaskGemmMatrixMultiply", "Row major linear FP16 format"),
                       layer("Reformat", "Row major linear FP32 format"),
                       layer("Myelin", "Row major linear FP16 format")]}
    full = {"Layers": [layer("CaskConvolution", "Row major linear FP32 format"),
                       layer("CaskGemmMatrixMultiply", "Row major linear FP32 format")]}
    rep = precision_report(half)
    assert rep["compute_layers"] == 3 and rep["half_fraction"] == 1.0 and is_half_engine(rep)
    rep = precision_report(full)
    assert rep["by_datatype"] == {"fp32": 2} and not is_half_engine(rep)
    assert not is_half_engine(precision_report({"Layers": ["names only"]}))
    assert datatype_of("Half") == "fp16" and datatype_of("Int8 NC32HW32") == "int8"


def test_profiles_come_from_the_graph_descriptions() -> None:
    specs = graph_specs((4, 64, 64), 512, 77, 768, "fp16")
    prof = specs["unet"].profile(opt=37, max_batch=148)
    assert prof["sample"] == ((1, 4, 64, 64), (37, 4, 64, 64), (148, 4, 64, 64))
    assert prof["timestep"] == ((1,), (37,), (148,))
    assert prof["encoder_hidden_states"][2] == (148, 77, 768)
    assert specs["unet"].inputs[1].dtype == "float32" and specs["unet"].inputs[0].dtype == "float16"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-TensorRT message cannot be shown")
def test_build_without_tensorrt_exits_1_with_the_install_hint(tiny_bundle) -> None:
    module, reason = tensorrt_status()
    assert module is None and "noop-rt[tensorrt]" in reason
    res = CliRunner().invoke(app, ["build", str(tiny_bundle)])
    assert res.exit_code == 1
    assert res.stderr.strip().startswith("error: ") and "TensorRT" in res.stderr and "NVIDIA GPU" in res.stderr
    res = CliRunner().invoke(app, ["classify", "x.png", "--bundle", str(tiny_bundle), "--backend", "tensorrt"])
    assert res.exit_code == 1 and "noop-rt[tensorrt]" in res.stderr


@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_build_and_run_fp16_engines(tiny_ckpt, tmp_path) -> None:  # pragma: no cover - needs TensorRT
    import io

    from noop_rt.engines import BuildOptions, build_engines, open_tensorrt_backend
    from noop_rt.export import ExportOptions, export_bundle

    bundle_dir = tmp_path / "b"
    export_bundle(tiny_ckpt, bundle_dir, ExportOptions(precision="fp16"), log=io.StringIO())
    record = build_engines(bundle_dir, BuildOptions(out=tmp_path / "e"), log=io.StringIO())
    assert (tmp_path / "e" / BUILD_JSON).is_file() and all(is_half_engine(g["precision_report"])
                                                          for g in record["graphs"].values())
    backend = open_tensorrt_backend(Bundle.open(bundle_dir), required=True, engines_dir=tmp_path / "e")
    assert backend.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16, 16)


def test_open_tensorrt_backend_refuses_stale_engines_with_the_reason(tiny_bundle, tmp_path, monkeypatch) -> None:
    """The use/refuse plumbing around TensorRT, with TensorRT itself stood in (it cannot be installed here): a stale
    build.json is refused with its reason under --backend tensorrt, and skipped with a note under auto."""
    import io
    import json

    import noop_rt.engines as engines
    from noop_rt.errors import EngineError

    monkeypatch.setattr(engines, "tensorrt_status", lambda: (object(), None))
    monkeypatch.setattr(engines, "environment", lambda trt: dict(ENV))
    bundle = Bundle.open(tiny_bundle)
    empty = tmp_path / "none"
    assert engines.open_tensorrt_backend(bundle, required=False, engines_dir=empty) is None
    with pytest.raises(EngineError, match="no engines in"):
        engines.open_tensorrt_backend(bundle, required=True, engines_dir=empty)
    stale = tmp_path / "stale"
    stale.mkdir()
    record = make_record(bundle, stale)
    record["tensorrt"] = "10.0.0"
    (stale / BUILD_JSON).write_text(json.dumps(record))
    log = io.StringIO()
    assert engines.open_tensorrt_backend(bundle, required=False, engines_dir=stale, log=log) is None
    assert "not used: built with TensorRT 10.0.0" in log.getvalue()
    # --engines reaches the loader from the command line
    res = CliRunner().invoke(app, ["classify", "x.png", "--bundle", str(tiny_bundle), "--backend", "tensorrt",
                                   "--engines", str(stale)])
    assert res.exit_code == 1 and "built with TensorRT 10.0.0" in res.stderr and str(stale) not in res.stdout
