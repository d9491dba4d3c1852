"""TensorRT path: everything around TensorRT is pure and tested here, with hand-written records, hand-computed shapes
and fake execution contexts. TensorRT itself cannot be installed on this project's machines, so the one test that
needs it skips with that reason."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from noop_rt.build.engines import builder_flags, datatype_of, is_half_engine, network_profile, precision_report
from noop_rt.cli import app
from noop_rt.demo import BUNDLE_DIR, EXAMPLES_DIR
from noop_rt.runtime.backends import tensorrt_plans as trt_plans
from noop_rt.runtime.backends import tensorrt_runner as trtb
from noop_rt.runtime.backends.base import installed, nvidia_gpus
from noop_rt.runtime.bundle import Bundle
from noop_rt.runtime.errors import EngineError, MissingDependencyError
from noop_rt.runtime.extras import install_hint
from noop_rt.runtime.graph_specs import GraphSpec, graph_specs

NO_TRT = "TensorRT is not installed (cannot be installed on this project's machines)"
ENV = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
FLAGS = {"strongly_typed": False, "fp16_flag": True, "builder_optimization_level": 3}


def demo_manifest() -> dict:
    return json.loads((BUNDLE_DIR / "manifest.json").read_text())


def fp16_demo(root: Path = BUNDLE_DIR) -> Bundle:
    """The demo bundle's manifest as if it had been exported --fp16 (no file is read but the manifest)."""
    m = demo_manifest()
    m["precision"] = "fp16"
    return Bundle(root, m)


# ----------------------------------------------------------------------------------------------- cache key
def key(onnx: str, weights: str | None, trt: str, gpu: str, cc: str, profile: dict, precision: str,
        flags: dict) -> str:
    """The cache key as documented (sha256 of these fields as sorted JSON, 24 hex digits): written out here so that
    a change of the stored key format is a deliberate one."""
    blob = json.dumps({"onnx": onnx, "weights": weights, "trt": trt, "gpu": gpu, "cc": cc,
                       "profile": {k: [list(s) for s in v] for k, v in profile.items()}, "precision": precision,
                       "flags": flags}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def test_cache_key_is_the_documented_digest_and_changes_with_every_input() -> None:
    profile = {"z0": ((1, 4, 64, 64), (1, 4, 64, 64), (1, 4, 64, 64))}
    args = ["a" * 64, "w" * 64, "10.13.0", "H100", "9.0", profile, "fp16", FLAGS]
    base = trt_plans.engine_cache_key(*args)
    assert base == key(*args)
    assert base == trt_plans.engine_cache_key(*copy.deepcopy(args))
    other_profile = {"z0": ((1, 4, 64, 64), (1, 4, 64, 64), (2, 4, 64, 64))}
    changes = {0: "b" * 64, 1: "v" * 64, 2: "11.0.0", 3: "L4", 4: "8.9", 5: other_profile, 6: "fp32",
               7: {**FLAGS, "builder_optimization_level": 5}}
    keys = {base}
    for i, value in changes.items():
        variant = list(args)
        variant[i] = value
        keys.add(trt_plans.engine_cache_key(*variant))
    assert len(keys) == 1 + len(changes)  # each input alone moves the key


def test_builder_flags_follow_the_tensorrt_major() -> None:
    assert builder_flags("11.0.1", 3) == {"strongly_typed": True, "fp16_flag": False, "builder_optimization_level": 3}
    assert builder_flags("10.13.0", 4) == {"strongly_typed": False, "fp16_flag": True, "builder_optimization_level": 4}
    assert builder_flags("12.1", 2)["strongly_typed"] is True


# ----------------------------------------------------------------------------------------------- profiles
def test_profiles_of_the_shipped_demo_manifest_match_hand_computed_shapes() -> None:
    bundle = fp16_demo()
    m = bundle.manifest
    # The numbers below are worked out by hand from these manifest values:
    assert (len(m["classes"]), m["images_per_batch"], m["max_batch"]) == (10, 4, 40)
    assert (m["resolution"], m["latent_shape"], m["max_tokens"], m["text_dim"]) == (16, [1, 16, 16], 8, 64)
    # images: batch 1 / 1 / images_per_batch=4; classes 1 / 10 / 10
    # the classifier's class embeddings are constants of its graph: only the image has a profile
    assert trt_plans.graph_profile(bundle, "classifier") == {"image": ((1, 3, 16, 16), (1, 3, 16, 16), (4, 3, 16, 16))}
    assert trt_plans.graph_profile(bundle, "vae_encoder") == {"image": ((1, 3, 16, 16), (1, 3, 16, 16), (4, 3, 16, 16))}
    assert trt_plans.graph_profile(bundle, "noise") == {"z0": ((1, 1, 16, 16), (1, 1, 16, 16), (4, 1, 16, 16))}
    # scorer rows: max_batch // classes = 40 // 10 = 4 (opt and max)
    assert trt_plans.graph_profile(bundle, "scorer") == {
        "z0": ((1, 1, 16, 16), (4, 1, 16, 16), (4, 1, 16, 16)),
        "eps": ((1, 1, 16, 16), (4, 1, 16, 16), (4, 1, 16, 16)),
        "timestep": ((1,), (4,), (4,)),
        "class_embeddings": ((1, 8, 64), (10, 8, 64), (10, 8, 64))}
    # prompts 1 / 10 / max(10, 64) = 64
    assert trt_plans.graph_profile(bundle, "text_encoder") == {"input_ids": ((1, 8), (10, 8), (64, 8))}


def test_profiles_of_an_sd15_shaped_manifest() -> None:
    """37 classes, 512 px, one image per UNet call (max batch 37), as `bench --backbone sd15-shape` exports."""
    specs = graph_specs((4, 64, 64), 512, 77, 768, ("l2",))
    m = {"classes": [f"c{i}" for i in range(37)], "images_per_batch": 1, "max_batch": 37, "precision": "fp16",
         "graphs": {name: spec.to_json() for name, spec in specs.items()}}
    bundle = Bundle(Path("sd15"), m)
    assert trt_plans.graph_profile(bundle, "classifier")["image"] == ((1, 3, 512, 512),) * 3
    assert trt_plans.graph_profile(bundle, "scorer")["z0"] == ((1, 4, 64, 64),) * 3  # 37 // 37 = 1 row
    assert trt_plans.graph_profile(bundle, "scorer")["class_embeddings"] == ((1, 77, 768), (37, 77, 768), (37, 77, 768))
    assert trt_plans.graph_profile(bundle, "text_encoder")["input_ids"] == ((1, 77), (37, 77), (64, 77))
    m["classes"] = m["classes"][:80] + [f"d{i}" for i in range(43)]  # 80 classes, max batch 37: still 1 row
    assert trt_plans.graph_profile(bundle, "scorer")["timestep"] == ((1,), (1,), (1,))
    assert trt_plans.graph_profile(bundle, "text_encoder")["input_ids"][2] == (80, 77)  # max(80, 64)


def test_network_profile_drops_inputs_the_parser_made_weights_and_refuses_unknown_ones() -> None:
    profile = trt_plans.graph_profile(fp16_demo(), "classifier")
    assert network_profile(profile, ["image"], "classifier") == {"image": profile["image"]}
    with pytest.raises(EngineError, match=r"input\(s\) mask"):
        network_profile(profile, ["image", "mask"], "classifier")


def test_axis_limits_come_from_the_recorded_profile() -> None:
    spec = fp16_demo().graphs["scorer"]
    recorded = {"z0": [[1, 1, 16, 16], [4, 1, 16, 16], [4, 1, 16, 16]],
                "timestep": [[1], [4], [4]], "class_embeddings": [[1, 8, 64], [10, 8, 64], [10, 8, 64]]}
    assert trt_plans.axis_limits(spec, recorded) == {"batch": 4, "classes": 10}
    recorded["timestep"] = [[1], [2], [3]]  # the tightest input wins
    assert trt_plans.axis_limits(spec, recorded) == {"batch": 3, "classes": 10}


# ----------------------------------------------------------------------------------------------- plan_problem
WEIGHTS_SHA = "5" * 64


def hand_record(bundle: Bundle, engines: Path) -> dict:
    """A build.json written out by hand for the fp16 demo manifest (its file hashes copied from the manifest)."""
    files = bundle.manifest["files"]
    bundle.manifest["files"]["weights.bin"] = {"sha256": WEIGHTS_SHA, "size": 1}
    images = {"image": [[1, 3, 16, 16], [1, 3, 16, 16], [4, 3, 16, 16]]}
    emb = {"class_embeddings": [[1, 8, 64], [10, 8, 64], [10, 8, 64]]}
    z = {"z0": [[1, 1, 16, 16], [1, 1, 16, 16], [4, 1, 16, 16]]}
    rows = [[1, 1, 16, 16], [4, 1, 16, 16], [4, 1, 16, 16]]
    profiles = {"classifier": images, "vae_encoder": images, "noise": z,  # the classifier bakes its class embeddings in
                "scorer": {"z0": rows, "eps": rows, "timestep": [[1], [4], [4]], **emb},
                "text_encoder": {"input_ids": [[1, 8], [10, 8], [64, 8]]}}
    graphs = {}
    for name, profile in profiles.items():
        sha = files[f"{name}.onnx"]["sha256"]
        (engines / f"{name}.plan").write_bytes(b"plan")
        graphs[name] = {"plan": f"{name}.plan", "onnx_sha256": sha, "profile": profile,
                        "cache_key": key(sha, WEIGHTS_SHA, ENV["tensorrt"], ENV["gpu"], ENV["compute_capability"],
                                         profile, "fp16", FLAGS)}
    return {"format": "noop-rt.engines", "version": 2, **ENV, "precision": "fp16", "flags": FLAGS,
            "weights_sha256": WEIGHTS_SHA, "graphs": graphs}


@pytest.mark.parametrize(("mutate", "says"), [
    (lambda r, b: r.update(tensorrt="10.12.0"), "built with TensorRT 10.12.0, this machine runs 10.13.0"),
    (lambda r, b: r.update(gpu="NVIDIA L4", compute_capability="8.9"), "sm 8.9"),
    (lambda r, b: r.update(compute_capability="9.1"), "sm 9.1"),
    (lambda r, b: r.update(version=1), "another format or version"),
    (lambda r, b: r.update(format="other"), "another format or version"),
    (lambda r, b: r.update(precision="fp32"), "built fp32 engines"),
    (lambda r, b: r.update(weights_sha256="6" * 64), "weights file weights.bin changed"),
    (lambda r, b: b.manifest["files"]["weights.bin"].update(sha256="7" * 64), "weights file weights.bin changed"),
    (lambda r, b: r["graphs"]["scorer"].update(onnx_sha256="0" * 64), "scorer.onnx changed"),
    (lambda r, b: b.manifest["files"]["noise.onnx"].update(sha256="1" * 64), "noise.onnx changed"),
    (lambda r, b: r["graphs"].pop("text_encoder"), "no engine for the text_encoder graph"),
    (lambda r, b: r["graphs"]["scorer"]["profile"]["z0"][2].__setitem__(0, 40), "scorer engine's profile"),
    (lambda r, b: b.manifest.update(max_batch=80), "scorer engine's profile"),
    (lambda r, b: b.manifest.update(images_per_batch=8), "classifier engine's profile"),
    (lambda r, b: r["graphs"]["noise"].update(cache_key="0" * 24), "noise engine's cache key"),
    (lambda r, b: r["graphs"]["noise"].update(plan="gone.plan"), "gone.plan is missing"),
])
def test_plan_problem_names_each_staleness_reason(mutate, says, tmp_path) -> None:
    bundle = fp16_demo()
    record = hand_record(bundle, tmp_path)
    assert trt_plans.plan_problem(record, ENV, bundle, tmp_path) is None
    assert trt_plans.plan_problem(record, ENV, bundle, tmp_path, FLAGS) is None
    mutate(record, bundle)
    reason = trt_plans.plan_problem(record, ENV, bundle, tmp_path)
    assert reason is not None and says in reason
    assert trt_plans.decide(reason, building=True) == ("rebuild", reason)
    assert trt_plans.decide(reason, building=False) == ("refuse", reason)


def test_plan_problem_without_engines_or_for_an_fp32_bundle(tmp_path) -> None:
    bundle = fp16_demo()
    record = hand_record(bundle, tmp_path)
    assert f"no engines in {tmp_path}" in trt_plans.plan_problem(None, ENV, bundle, tmp_path)
    assert "another format" in trt_plans.plan_problem({}, ENV, bundle, tmp_path)  # unreadable build.json
    fp32 = Bundle(BUNDLE_DIR, demo_manifest())
    assert "built from fp16 bundles" in trt_plans.plan_problem(record, ENV, fp32, tmp_path)
    (tmp_path / "scorer.plan").unlink()
    assert "scorer.plan is missing" in trt_plans.plan_problem(record, ENV, bundle, tmp_path)


def test_decide_and_builder_flags_drive_rebuilds(tmp_path) -> None:
    bundle = fp16_demo()
    record = hand_record(bundle, tmp_path)
    assert trt_plans.decide(None, building=True) == ("use", "engines match the bundle, TensorRT version and GPU")
    assert trt_plans.decide(None, building=False)[0] == "use"
    assert trt_plans.decide(None, building=True, force=True) == ("rebuild", "--force given")
    assert trt_plans.decide(None, building=False, force=True)[0] == "use"  # --force is a build option
    level5 = {**FLAGS, "builder_optimization_level": 5}
    reason = trt_plans.plan_problem(record, ENV, bundle, tmp_path, level5)
    assert reason is not None and "builder flags" in reason  # build --optimization-level 5 rebuilds
    assert trt_plans.plan_problem(record, ENV, bundle, tmp_path, None) is None  # run time: any flags


def test_read_record(tmp_path) -> None:
    assert trt_plans.read_record(tmp_path) is None
    (tmp_path / "build.json").write_text("{not json")
    assert trt_plans.read_record(tmp_path) == {}
    (tmp_path / "build.json").write_text('{"format": "noop-rt.engines"}')
    assert trt_plans.read_record(tmp_path) == {"format": "noop-rt.engines"}


# ----------------------------------------------------------------------------------------------- precision report
def test_precision_report_catches_an_fp32_engine() -> None:
    def layer(kind: str, fmt: str) -> dict:
        return {"Name": kind.lower() + "_1", "LayerType": kind, "Outputs": [{"Format/Datatype": fmt}]}

    half = {"Layers": [layer("CaskConvolution", "Channel major FP16 format where channel % 8 == 0"),
                       layer("CaskGemmMatrixMultiply", "Row major linear FP16 format"),
                       layer("Reformat", "Row major linear FP32 format"),
                       layer("Myelin", "Row major linear FP16 format")]}
    full = {"Layers": [layer("CaskConvolution", "Row major linear FP32 format"),
                       layer("CaskGemmMatrixMultiply", "Row major linear FP32 format")]}
    mixed = {"Layers": [layer("CaskConvolution", "Row major linear FP32 format"),
                        layer("CaskGemmMatrixMultiply", "Row major linear FP16 format"),
                        layer("Myelin", "Row major linear FP32 format")]}
    rep = precision_report(half)
    assert rep == {"compute_layers": 3, "by_datatype": {"fp16": 3}, "half_fraction": 1.0} and is_half_engine(rep)
    rep = precision_report(full)
    assert rep["by_datatype"] == {"fp32": 2} and not is_half_engine(rep)
    rep = precision_report(mixed)
    assert rep["compute_layers"] == 3 and abs(rep["half_fraction"] - 1 / 3) < 1e-12 and not is_half_engine(rep)
    assert is_half_engine(rep, min_fraction=0.3)
    assert not is_half_engine(precision_report({"Layers": ["names only"]}))
    assert datatype_of("Half") == "fp16" and datatype_of("Int8 NC32HW32") == "int8" and datatype_of("?") == "other"


# ----------------------------------------------------------------------------------------------- run-time steps
class FakeContext:
    """An IExecutionContext stand-in: accepts input shapes inside `limits`, reports `shapes` for outputs."""

    def __init__(self, limits: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
        self.limits, self.shapes, self.calls = limits, shapes, []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.calls.append((name, shape))
        return all(d <= m for d, m in zip(shape, self.limits[name], strict=True))

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]


def test_bind_shapes_raises_when_tensorrt_refuses_a_shape() -> None:
    profile = {"z0": [[1, 1, 16, 16], [4, 1, 16, 16], [4, 1, 16, 16]]}
    ctx = FakeContext({"z0": (4, 1, 16, 16)}, {})
    trtb.bind_shapes(ctx, "scorer", {"z0": np.zeros((3, 1, 16, 16), np.float32)}, profile)
    assert ctx.calls == [("z0", (3, 1, 16, 16))]
    with pytest.raises(EngineError) as err:
        trtb.bind_shapes(ctx, "scorer", {"z0": np.zeros((5, 1, 16, 16), np.float32)}, profile)
    message = str(err.value)
    for part in ("(5, 1, 16, 16)", "'z0'", "scorer", "min (1, 1, 16, 16)", "max (4, 1, 16, 16)"):
        assert part in message
    with pytest.raises(EngineError, match="no profile recorded"):
        trtb.bind_shapes(ctx, "scorer", {"z0": np.zeros((5, 1, 16, 16), np.float32)}, {})


def test_output_shapes_are_read_from_the_context_not_the_spec() -> None:
    spec = fp16_demo().graphs["scorer"]  # says (batch, classes)
    ctx = FakeContext({}, {"errors_l2": (3, 7), "errors_l1": (3, 7)})
    assert trtb.output_shapes(ctx, "scorer", ["errors_l2", "errors_l1"]) == {"errors_l2": (3, 7), "errors_l1": (3, 7)}
    assert spec.outputs[0].shape == ("batch", "classes")
    with pytest.raises(EngineError, match="could not infer the shape of output 'errors_l2'"):
        trtb.output_shapes(FakeContext({}, {"errors_l2": (-1, 7)}), "scorer", ["errors_l2"])


def test_engine_feeds_casts_fills_the_baked_default_and_rejects_unknown_inputs() -> None:
    emb = np.ones((10, 8, 64), np.float32)
    inputs = {"image": np.dtype(np.float32)}
    image = np.zeros((2, 3, 16, 16), np.float64)
    fed = trtb.engine_feeds("classifier", inputs, {"image": image}, {})
    assert fed["image"].dtype == np.float32 and fed["image"].flags.c_contiguous
    with pytest.raises(EngineError, match="no input class_embeddings"):  # baked in as weights by the parser
        trtb.engine_feeds("classifier", inputs, {"image": image, "class_embeddings": emb}, {})
    both = {"image": np.dtype(np.float32), "class_embeddings": np.dtype(np.float32)}
    fed = trtb.engine_feeds("classifier", both, {"image": image}, {"class_embeddings": lambda: emb})
    assert fed["class_embeddings"] is not None and np.array_equal(fed["class_embeddings"], emb)
    with pytest.raises(EngineError, match="needs input 'class_embeddings'"):
        trtb.engine_feeds("classifier", both, {"image": image}, {})
    assert trtb.numpy_dtype("DataType.HALF") == np.float16 and trtb.numpy_dtype("INT64") == np.int64
    with pytest.raises(EngineError, match="FP8"):
        trtb.numpy_dtype("DataType.FP8")


def fake_scorer(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """errors[r, k] = f(row r) + g(class k): a stand-in engine with independent rows and classes."""
    rows = feeds["z0"].reshape(len(feeds["z0"]), -1).sum(1) + 10 * feeds["timestep"]
    classes = feeds["class_embeddings"].reshape(len(feeds["class_embeddings"]), -1).sum(1)
    return [rows[:, None] * 1000 + classes[None, :]]


def test_run_split_respects_the_profile_and_puts_rows_and_classes_back_in_order() -> None:
    spec = fp16_demo().graphs["scorer"]
    rng = np.random.default_rng(0)
    feeds = {"z0": rng.random((11, 1, 16, 16)), "eps": rng.random((11, 1, 16, 16)), "timestep": rng.random(11),
             "class_embeddings": rng.random((23, 8, 64))}
    seen = []

    def execute(part):
        seen.append((len(part["z0"]), len(part["class_embeddings"])))
        assert len(part["z0"]) == len(part["eps"]) == len(part["timestep"])
        return fake_scorer(part)

    out = trtb.run_split(spec, feeds, ["errors_l2"], {"batch": 4, "classes": 10}, ("batch", "classes"), execute)
    np.testing.assert_array_equal(out[0], fake_scorer(feeds)[0])
    assert out[0].shape == (11, 23)
    assert sorted(seen) == sorted([(r, k) for r in (4, 4, 3) for k in (10, 10, 3)])
    seen.clear()  # within the profile: one call, untouched
    small = {k: v[:2] for k, v in feeds.items()}
    trtb.run_split(spec, small, ["errors_l2"], {"batch": 4, "classes": 10}, ("batch", "classes"), execute)
    assert seen == [(2, 2)]


def test_join_outputs_refuses_an_axis_the_output_lacks() -> None:
    spec = GraphSpec.from_json("noise", fp16_demo().manifest["graphs"]["noise"])
    with pytest.raises(EngineError, match="no such axis"):
        trtb.join_outputs(spec, ["eps"], [[np.zeros((1, 1, 16, 16))]], "classes")


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA H100 80GB HBM3, 9.0\nNVIDIA GeForce RTX 4090, 8.9\n\n"
    assert trt_plans.parse_nvidia_smi(text) == [{"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                                           {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}]


# ----------------------------------------------------------------------------------------------- availability
@pytest.mark.skipif(installed("tensorrt"), reason="TensorRT is installed here: its absence cannot be shown")
def test_unavailable_says_why_here() -> None:
    reason = trt_plans.unavailable(Bundle(BUNDLE_DIR, demo_manifest()), None)
    assert reason is not None and reason.startswith("tensorrt is not installed") and install_hint("tensorrt") in reason


def test_unavailable_checks_the_engines_against_this_machine(tmp_path, monkeypatch) -> None:
    """TensorRT, Polygraphy and a GPU stood in (they cannot be installed here); the decision itself is real."""
    monkeypatch.setattr(trt_plans, "installed", lambda module: True)
    monkeypatch.setattr(trt_plans, "nvidia_gpus", lambda: 1)
    monkeypatch.setattr(trt_plans, "environment", lambda index=0, trt=None: dict(ENV))
    bundle = fp16_demo()
    assert "no engines in" in trt_plans.unavailable(bundle, tmp_path / "none")
    record = hand_record(bundle, tmp_path)
    (tmp_path / "build.json").write_text(json.dumps(record))
    assert trt_plans.unavailable(bundle, tmp_path) is None
    record["tensorrt"] = "10.0.0"
    (tmp_path / "build.json").write_text(json.dumps(record))
    assert "built with TensorRT 10.0.0" in trt_plans.unavailable(bundle, tmp_path)
    assert "fp16 bundles" in trt_plans.unavailable(Bundle(BUNDLE_DIR, demo_manifest()), tmp_path)


@pytest.mark.skipif(installed("tensorrt"), reason="TensorRT is installed here: its absence cannot be shown")
def test_backend_tensorrt_is_refused_with_the_reason() -> None:
    import noop_rt

    with pytest.raises(MissingDependencyError, match="tensorrt is not installed"):
        noop_rt.load(backend="tensorrt")
    res = CliRunner().invoke(app, ["classify", str(EXAMPLES_DIR / "eight.png"), "--backend", "tensorrt"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "tensorrt" in res.stderr


# ----------------------------------------------------------------------------------------------- noop-rt build
def test_build_refuses_an_fp32_bundle_in_one_line() -> None:
    res = CliRunner().invoke(app, ["build", str(BUNDLE_DIR)])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "fp32 bundle" in res.stderr and "--fp16" in res.stderr


@pytest.fixture
def fp16_copy(tmp_path) -> Path:
    """A copy of the demo bundle whose manifest says fp16 (its files unchanged, so it verifies)."""
    root = tmp_path / "digits16"
    shutil.copytree(BUNDLE_DIR, root, ignore=shutil.ignore_patterns(".verified.json"))
    m = json.loads((root / "manifest.json").read_text())
    m["precision"] = "fp16"
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_engines_option_reaches_the_check_from_the_command_line(fp16_copy, tmp_path, monkeypatch) -> None:
    """`--engines DIR` gets to `unavailable` through the opener; the reason comes back as the one error line."""
    monkeypatch.setattr(trt_plans, "installed", lambda module: True)
    monkeypatch.setattr(trt_plans, "nvidia_gpus", lambda: 1)
    monkeypatch.setattr(trt_plans, "environment", lambda index=0, trt=None: dict(ENV))
    stale = tmp_path / "stale"
    stale.mkdir()
    record = hand_record(Bundle(fp16_copy, json.loads((fp16_copy / "manifest.json").read_text())), stale)
    record["tensorrt"] = "10.0.0"
    (stale / "build.json").write_text(json.dumps(record))
    res = CliRunner().invoke(app, ["classify", str(EXAMPLES_DIR / "eight.png"), "--bundle", str(fp16_copy),
                                   "--backend", "tensorrt", "--engines", str(stale)])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert "built with TensorRT 10.0.0, this machine runs 10.13.0" in res.stderr


@pytest.mark.skipif(installed("tensorrt") and nvidia_gpus() > 0, reason="TensorRT and a GPU are here")
def test_build_without_tensorrt_exits_1_with_the_install_hint(fp16_copy, tmp_path) -> None:
    res = CliRunner().invoke(app, ["build", str(fp16_copy), "--out", str(tmp_path / "engines")])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert "TensorRT" in res.stderr and install_hint("tensorrt") in res.stderr
    assert not (tmp_path / "engines").exists()


def test_build_verifies_every_file_first(fp16_copy) -> None:
    weights = fp16_copy / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only a full sha256 check notices
    weights.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["build", str(fp16_copy)])
    assert res.exit_code == 1 and "weights.bin does not match the sha256" in res.stderr


# ----------------------------------------------------------------------------------------------- real TensorRT
@pytest.mark.skipif(not installed("tensorrt"), reason=NO_TRT)
def test_build_and_run_fp16_engines(tmp_path) -> None:  # pragma: no cover - needs TensorRT and a GPU
    import io

    if not nvidia_gpus():
        pytest.skip("no NVIDIA GPU")
    from noop_rt.build.engines import BuildOptions, build_engines
    from noop_rt.build.export import ExportOptions, export_bundle
    from noop_rt.demo import CKPT_PATH
    from noop_rt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

    bundle_dir = tmp_path / "b"
    export_bundle(CKPT_PATH, bundle_dir, ExportOptions(precision="fp16"), log=io.StringIO())
    record = build_engines(bundle_dir, BuildOptions(out=tmp_path / "e"), log=io.StringIO())
    assert all(is_half_engine(g["precision_report"]) for g in record["graphs"].values())
    bundle = Bundle.open(bundle_dir)
    assert trt_plans.unavailable(bundle, tmp_path / "e") is None
    runner = trtb.TensorRTRunner(bundle, tmp_path / "e", "cuda:0")
    reference = OnnxRuntimeRunner(bundle)
    images = np.random.default_rng(0).uniform(-1, 1, (6, 3, 16, 16)).astype(np.float32)  # 6 > the profile's 4
    got = runner.run("classifier", {"image": images}, ["errors"])[0]
    want = reference.run("classifier", {"image": images}, ["errors"])[0]
    assert got.shape == want.shape == (6, 10)
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()
    runner.close()


def test_tensorrt_availability_is_answered_without_the_runner() -> None:
    """`auto` asks whether TensorRT can run the bundle (tensorrt_plans) and never imports the runner to find out."""
    import subprocess
    import sys

    code = ("import sys, noop_rt\nnoop_rt.load()\nprint(sorted(m for m in sys.modules if 'tensorrt' in m))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['noop_rt.runtime.backends.tensorrt_plans']"
