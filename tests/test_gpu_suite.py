"""benchmarks/gpu_suite.py: the parts that need no GPU (arguments, the step list, --dry-run, the step runner with
trivial child processes). The GPU steps themselves run only on a lent GPU machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL = {f: True for f in ("gpu", "torch", "torch_cuda", "onnxruntime_cuda", "tensorrt", "diffusers")}
NONE = {f: False for f in ALL}


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


def steps_by_name(suite, cfg, facts) -> dict:
    return {s.name: s for s in suite.plan_steps(cfg, facts)}


def test_parse_args_defaults_and_checks(suite, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "o"))
    cfg = suite.parse_args([])
    assert cfg.out == tmp_path / "o" and cfg.classes == 37 and not cfg.dry_run and cfg.wheels is None
    monkeypatch.delenv("OUT")
    cfg = suite.parse_args(["--out", "x", "--classes", "5", "--only", "demo-torch, sd15-torch", "--skip",
                            "train-memory", "--assume", "tensorrt=no", "--assume", "gpu=yes", "--dry-run"])
    assert cfg.out == Path("x") and cfg.classes == 5 and cfg.dry_run
    assert cfg.only == ["demo-torch", "sd15-torch"] and cfg.skip == ["train-memory"]
    assert cfg.assume == {"tensorrt": False, "gpu": True}
    for bad in (["--only", "demo-trt"], ["--assume", "tensorrt=maybe"], ["--assume", "cuda=yes"]):
        with pytest.raises(SystemExit) as exit_:
            suite.parse_args(bad)
        assert exit_.value.code == 2


def test_step_list_with_every_engine_present(suite, tmp_path) -> None:
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w", classes=37)
    steps = steps_by_name(suite, cfg, ALL)
    assert [n for n, s in steps.items() if s.skip] == []
    assert list(steps)[:3] == ["gpu-info", "versions", "demo-torch"]
    torch_cmd = steps["demo-torch"].cmd
    assert torch_cmd[1:4] == ["-m", "noop_rt", "bench"]
    assert {"--backends", "torch", "--device", "cuda", "--fp16"} <= set(torch_cmd)
    assert {"onnxruntime", "cuda"} <= set(steps["demo-onnxruntime-cuda"].cmd)
    sd15 = steps["sd15-torch"].cmd
    assert sd15[sd15.index("--backbone") + 1] == "sd15-shape" and sd15[sd15.index("--num-classes") + 1] == "37"
    # the TensorRT chain: export --fp16 -> build that bundle -> bench those engines
    export, build, bench = (steps[n].cmd for n in ("sd15-export-fp16", "sd15-build", "sd15-tensorrt"))
    bundle = export[export.index("--out") + 1]
    assert "--fp16" in export and build[build.index("build") + 1] == bundle
    assert bench[bench.index("--bundle") + 1] == bundle
    assert bench[bench.index("--engines") + 1] == build[build.index("--out") + 1]
    assert steps["sd15-build"].needs == ("sd15-export-fp16",) and steps["sd15-tensorrt"].needs == ("sd15-build",)
    ckpt = export[export.index("--ckpt") + 1]
    assert ckpt.endswith("sd15-shape-37.pt") and steps["sd15-checkpoint"].cmd[-2:] == [str(tmp_path / "w/cache"),
                                                                                        "37"]
    assert {"--device", "cuda", "--fp16"} <= set(steps["train-memory"].cmd)
    for step in steps.values():
        if step.result is not None and "bench" in step.cmd:
            assert step.cmd[step.cmd.index("--out") + 1] == str(step.result)


def test_fast_path_variants_rerun_their_base_bench_with_one_switch(suite, tmp_path) -> None:
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w")
    steps = steps_by_name(suite, cfg, ALL)
    pairs = {"demo-torch-cudagraph": ("demo-torch", {"NOOP_RT_TORCH_CUDA_GRAPH": "1"}),
             "demo-onnxruntime-cuda-plain": ("demo-onnxruntime-cuda", {"NOOP_RT_ORT_IOBINDING": "0"}),
             "demo-onnxruntime-cuda-graph": ("demo-onnxruntime-cuda", {"NOOP_RT_ORT_CUDA_GRAPH": "1"}),
             "demo-tensorrt-cudagraph": ("demo-tensorrt", {"NOOP_RT_TRT_CUDA_GRAPH": "1"}),
             "sd15-torch-cudagraph": ("sd15-torch", {"NOOP_RT_TORCH_CUDA_GRAPH": "1"}),
             "sd15-onnxruntime-cuda-graph": ("sd15-onnxruntime-cuda", {"NOOP_RT_ORT_CUDA_GRAPH": "1"}),
             "sd15-tensorrt-cudagraph": ("sd15-tensorrt", {"NOOP_RT_TRT_CUDA_GRAPH": "1"})}
    names = list(steps)
    results = set()
    for name, (base_name, env) in pairs.items():
        step, base = steps[name], steps[base_name]
        assert step.env == env and base.env == {} and names.index(name) > names.index(base_name)
        assert step.needs == base.needs and step.requires == base.requires
        assert step.result != base.result and step.result.parent == base.result.parent
        results.add(step.result)
        swap = [c for c, b in zip(step.cmd, base.cmd, strict=True) if c != b]
        assert swap == [str(step.result)]  # the same command, only its report elsewhere
    assert len(results) == len(pairs)
    tests = steps["gpu-path-tests"]
    assert tests.cmd[-1] == "tests/test_gpu_paths.py" and (ROOT / tests.cmd[-1]).is_file()
    no_ort = steps_by_name(suite, cfg, {**ALL, "onnxruntime_cuda": False})
    assert "CUDAExecutionProvider" in no_ort["demo-onnxruntime-cuda-graph"].skip


def test_runner_sets_a_steps_environment(suite, tmp_path) -> None:
    py = sys.executable
    show = "import os; print('switch=' + os.environ.get('NOOP_RT_TORCH_CUDA_GRAPH', 'unset'))"
    steps = [suite.Step("with", [py, "-c", show], env={"NOOP_RT_TORCH_CUDA_GRAPH": "1"}),
             suite.Step("without", [py, "-c", show])]
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w", step_timeout=60, deadline=120)
    summary = suite.Suite(cfg, suite.child_env(cfg), {}).run(steps)
    got = {s["name"]: s for s in summary["steps"]}
    assert "switch=1" in got["with"]["tail"] and "switch=unset" in got["without"]["tail"]
    assert got["with"]["env"] == {"NOOP_RT_TORCH_CUDA_GRAPH": "1"} and "env" not in got["without"]
    assert got["with"]["cmd"].startswith("NOOP_RT_TORCH_CUDA_GRAPH=1 ")


def test_step_list_without_gpu_engines_says_why(suite, tmp_path) -> None:
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w")
    facts = {**ALL, "tensorrt": False, "onnxruntime_cuda": False}
    steps = steps_by_name(suite, cfg, facts)
    for name in ("demo-export-fp16", "demo-build", "demo-tensorrt", "sd15-build", "sd15-tensorrt", "tensorrt-tests"):
        assert "tensorrt" in steps[name].skip
    assert "CUDAExecutionProvider" in steps["demo-onnxruntime-cuda"].skip
    assert "no step that would run here needs it" in steps["sd15-export-fp16"].skip  # no engine for its bundle
    assert steps["demo-torch"].skip is None and steps["sd15-torch"].skip is None
    assert steps["sd15-checkpoint"].skip is None  # sd15-torch needs it
    steps = steps_by_name(suite, cfg, {**facts, "torch_cuda": False})  # a CPU machine: nothing to prepare for
    assert "needs it" in steps["sd15-checkpoint"].skip
    steps = steps_by_name(suite, cfg, NONE)
    assert steps["versions"].skip is None and "nvidia-smi" in steps["gpu-info"].skip
    cfg.only, cfg.skip = ["demo-torch", "train-memory"], ["train-memory"]
    steps = steps_by_name(suite, cfg, ALL)
    assert [n for n, s in steps.items() if s.skip is None] == ["demo-torch"]


def test_wheel_setup_removes_the_cpu_onnxruntime_first(suite, tmp_path) -> None:
    (tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl").write_bytes(b"")
    (tmp_path / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w", wheels=tmp_path, site=tmp_path / "site")
    remove, install = suite.setup_steps(cfg)
    assert remove.cmd[-3:] == ["-y", "-q", "onnxruntime"]
    assert install.cmd[install.cmd.index("--target") + 1] == str(tmp_path / "site") and len(install.cmd) > 2
    assert sum(c.endswith(".whl") for c in install.cmd) == 2
    assert suite.child_env(cfg)["PYTHONPATH"].split(":")[:2] == [str(tmp_path / "site"), str(ROOT)]


def test_dry_run_prints_every_command_and_runs_nothing(suite, tmp_path, capsys) -> None:
    out, work = tmp_path / "o", tmp_path / "w"
    args = ["--dry-run", "--out", str(out), "--work", str(work)] + [f"--assume={f}=yes" for f in ALL]
    assert suite.main(args) == 0
    printed = capsys.readouterr().out
    cfg = suite.Config(out=out, work=work)
    for step in suite.plan_steps(cfg, ALL):
        assert f"[{step.name}] " in printed
    assert "noop_rt build " + str(work / "sd15-37-fp16") in printed
    assert not out.exists() and not work.exists()


def test_runner_continues_past_failures_skips_dependents_and_stops_overruns(suite, tmp_path) -> None:
    py = sys.executable
    result = tmp_path / "r.json"
    steps = [
        suite.Step("ok", [py, "-c", f"import json; print('hello'); json.dump({{'x': 1}}, open({str(result)!r}, 'w'))"],
                   result=result),
        suite.Step("fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"]),
        suite.Step("after-fails", [py, "-c", "print('never')"], needs=("fails",)),
        suite.Step("too-long", [py, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"], timeout=1),
        suite.Step("not-here", [py, "-c", "print('never')"], skip="not here: tensorrt"),
        suite.Step("after-ok", [py, "-c", "print('still running')"], needs=("ok",)),
    ]
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w", step_timeout=60, deadline=300)
    echo = []

    class Echo:
        def write(self, text):
            echo.append(text)

        def flush(self):
            pass

    summary = suite.Suite(cfg, suite.child_env(cfg), {"gpu": False}, echo=Echo()).run(steps)
    got = {s["name"]: s for s in summary["steps"]}
    assert [got[n]["status"] for n in got] == ["ok", "failed", "skipped", "timeout", "skipped", "ok"]
    assert got["ok"]["result"] == {"x": 1} and "hello" in got["ok"]["tail"]
    assert got["fails"]["rc"] == 3 and "boom" in got["fails"]["tail"]
    assert "needs fails" in got["after-fails"]["reason"]
    assert "sleeping" in got["too-long"]["tail"] and got["too-long"]["rc"] is None
    assert got["not-here"]["reason"] == "not here: tensorrt"
    on_disk = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [s["status"] for s in on_disk["steps"]] == [got[n]["status"] for n in got]
    log = (tmp_path / "o" / "suite.log").read_text()
    assert "never" not in log.replace("print('never')", "") and "still running" in log
    assert len(echo) == len(steps)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["suite.log", "summary.json"]  # <= 8 files back


def test_runner_skips_what_cannot_start_before_the_deadline(suite, tmp_path) -> None:
    cfg = suite.Config(out=tmp_path / "o", work=tmp_path / "w", deadline=10)
    summary = suite.Suite(cfg, suite.child_env(cfg), {}).run([suite.Step("late", [sys.executable, "-c", "1"])])
    assert summary["steps"][0]["status"] == "skipped" and "out of time" in summary["steps"][0]["reason"]
