"""Every GPU check and measurement of noop-rt in ONE command, for a session that is lent an H100/H200 for minutes.

    python3 benchmarks/gpu_suite.py [--out DIR] [--wheels DIR] [--deadline S] [--step-timeout S]
                                    [--only A,B] [--skip A,B] [--classes 37] [--dry-run]

Steps run in priority order (the cheap, most wanted ones first, so a short lease still yields them), each with its own
timeout, each failure recorded and passed over; a step whose prerequisite failed is skipped with that reason, and so
is a step whose engine is not here (onnxruntime-gpu, TensorRT). `--dry-run` prints the step list with each command
and runs nothing. Results: `summary.json` (machine facts, each step's command, status, seconds, output tail and the
JSON it produced: bench reports, the training-memory table) and `suite.log` (all output), both rewritten as the
suite goes, so a run cut off at the device's limit still returns what it did. Two files: the device machine returns at
most 8 files from $OUT. Bundles, engines and the SD-1.5-shape model live in `--work` (default /tmp/noop-gpu-suite).

On the lent machine (see ../shared/gpu/README.md and the device README): the project travels as the working tree and
runs as `python3 -m noop_rt` with the repository on PYTHONPATH (nothing to install). Packages the image lacks
(diffusers, onnxruntime-gpu) travel as wheels, reassembled under /tmp/w by the earlier calls; `--wheels /tmp/w`
installs them into `--site` (default /tmp/site) first and, when onnxruntime-gpu is among them, uninstalls the image's
CPU onnxruntime (noop-rt refuses to run with both builds installed). The last call is then, e.g.:

    python3 benchmarks/gpu_suite.py --wheels /tmp/w --deadline 540      # timeout_s 600 on the device call

The GPU fast paths are measured beside their plain runs: each `*-cudagraph` / `*-graph` / `*-plain` step is its
base bench again with one switch set in its environment (NOOP_RT_TORCH_CUDA_GRAPH, NOOP_RT_ORT_CUDA_GRAPH,
NOOP_RT_ORT_IOBINDING=0, NOOP_RT_TRT_CUDA_GRAPH), and `gpu-path-tests` checks their outputs against the plain paths
(tests/test_gpu_paths.py).

TensorRT cannot be installed on this project's machines: its steps are skipped there ("tensorrt is not importable")
and run on a machine that has it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
DEMO_CKPT = "noop_rt/demo/digits.pt"
FACTS = ("gpu", "torch", "torch_cuda", "onnxruntime_cuda", "tensorrt", "diffusers")
PROBE = r"""
import importlib.util, json, shutil
have = lambda m: importlib.util.find_spec(m) is not None
facts = {"gpu": shutil.which("nvidia-smi") is not None, "torch": have("torch"), "torch_cuda": False,
         "onnxruntime_cuda": False, "tensorrt": have("tensorrt") and have("polygraphy"), "diffusers": have("diffusers")}
if facts["torch"]:
    import torch
    facts["torch_cuda"] = torch.cuda.is_available()
if have("onnxruntime"):
    import onnxruntime
    facts["onnxruntime_cuda"] = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
print(json.dumps(facts))
"""
VERSIONS = r"""
import importlib, json, platform
out = {"python": platform.python_version()}
for m in ("torch", "onnxruntime", "diffusers", "transformers", "onnx", "tensorrt", "polygraphy", "numpy"):
    try:
        out[m] = importlib.import_module(m).__version__
    except Exception as exc:
        out[m] = f"missing ({type(exc).__name__})"
try:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(cuda=torch.version.cuda, gpu=p.name, cc=f"{p.major}.{p.minor}",
                   gpu_gib=round(p.total_memory / 2**30, 1))
except Exception as exc:
    out["torch_cuda"] = f"failed ({exc})"
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass
print(json.dumps(out, indent=1))
"""


@dataclass
class Step:
    name: str
    cmd: list[str]
    needs: tuple[str, ...] = ()  # steps that must have succeeded
    requires: tuple[str, ...] = ()  # facts (FACTS) that must hold
    timeout: float | None = None  # None: --step-timeout
    result: Path | None = None  # a JSON file the step writes, embedded into summary.json
    skip: str | None = None  # why it will not run (decided when planning)
    prepares: bool = False  # only makes what later steps use (skipped when none of them runs)
    env: dict[str, str] = field(default_factory=dict)  # set for this step only (the GPU fast-path switches)


@dataclass
class Config:
    out: Path
    work: Path
    wheels: Path | None = None
    site: Path = Path("/tmp/site")
    classes: int = 37
    step_timeout: float = 240.0
    deadline: float = 570.0
    runs: int = 20
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    dry_run: bool = False
    assume: dict[str, bool] = field(default_factory=dict)


def noop(*args: str) -> list[str]:
    """`noop-rt ARGS` as it runs on the device machine: the repository on PYTHONPATH, nothing installed."""
    return [sys.executable, "-m", "noop_rt", *args]


# The GPU fast paths, each switched on by an environment variable (noop_rt/runtime/backends/*_runner.py); the default
# runs stay as they are, so each variant is measured beside its baseline.
TORCH_CUDA_GRAPH = {"NOOP_RT_TORCH_CUDA_GRAPH": "1"}  # the classifier module replayed from CUDA graphs
ORT_PLAIN = {"NOOP_RT_ORT_IOBINDING": "0"}  # session.run, no IO binding (the CUDA default binds)
ORT_CUDA_GRAPH = {"NOOP_RT_ORT_CUDA_GRAPH": "1"}  # IO binding + one CUDA-graph session per classifier shape
TRT_CUDA_GRAPH = {"NOOP_RT_TRT_CUDA_GRAPH": "1"}  # execute_async_v3 captured per classifier shape


def variant(base: Step, name: str, env: dict[str, str]) -> Step:
    """`base` (a bench step) again with `env` set, writing its report beside the base's as `*-NAME-suffix.json`."""
    assert base.result is not None
    result = base.result.with_name(f"{base.result.stem}-{name.removeprefix(base.name + '-')}.json")
    cmd = [str(result) if c == str(base.result) else c for c in base.cmd]
    return Step(name, cmd, needs=base.needs, requires=base.requires, timeout=base.timeout, result=result, env=env)


def plan_steps(cfg: Config, facts: dict[str, bool]) -> list[Step]:
    """The suite's steps, in the order they run, each marked with why it is skipped (or None)."""
    w, k, runs = cfg.work, str(cfg.classes), str(cfg.runs)
    cache, sd15_ckpt = w / "cache", w / "cache" / f"sd15-shape-{cfg.classes}.pt"
    demo16, sd16 = w / "demo-fp16", w / f"sd15-{cfg.classes}-fp16"
    timing = w / "timing.cache"
    sd15_bench = ["--backbone", "sd15-shape", "--num-classes", k, "--cache-dir", str(cache), "--no-startup"]
    steps = [
        Step("gpu-info", ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,compute_cap,clocks.max.sm,"
                          "power.limit", "--format=csv"], requires=("gpu",), timeout=30),
        Step("versions", [sys.executable, "-c", VERSIONS], timeout=120),
        # the shipped demo (16 px, 10 classes): every backend here
        demo_torch := Step("demo-torch", noop("bench", "--backends", "torch", "--device", "cuda", "--fp16", "--runs",
                                              runs, "--out", str(w / "bench-demo-torch.json")),
                           requires=("torch_cuda", "diffusers"), result=w / "bench-demo-torch.json"),
        variant(demo_torch, "demo-torch-cudagraph", TORCH_CUDA_GRAPH),
        demo_ort := Step("demo-onnxruntime-cuda", noop("bench", "--backends", "onnxruntime", "--device", "cuda",
                                                       "--runs", runs, "--out",
                                                       str(w / "bench-demo-onnxruntime.json")),
                         requires=("onnxruntime_cuda",), result=w / "bench-demo-onnxruntime.json"),
        variant(demo_ort, "demo-onnxruntime-cuda-plain", ORT_PLAIN),
        variant(demo_ort, "demo-onnxruntime-cuda-graph", ORT_CUDA_GRAPH),
        # the fast paths against their plain runs, on the demo (tests skip what this machine lacks)
        Step("gpu-path-tests", [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gpu_paths.py"],
             requires=("gpu", "torch"), timeout=180),
        Step("demo-export-fp16", noop("export", "--ckpt", DEMO_CKPT, "--out", str(demo16), "--fp16", "--force"),
             requires=("tensorrt", "torch", "diffusers"), prepares=True),
        Step("demo-build", noop("build", str(demo16), "--out", str(w / "engines-demo"), "--timing-cache",
                                str(timing)), needs=("demo-export-fp16",), requires=("tensorrt",)),
        demo_trt := Step("demo-tensorrt", noop("bench", "--bundle", str(demo16), "--ckpt", DEMO_CKPT, "--backends",
                                               "tensorrt", "--engines", str(w / "engines-demo"), "--runs", runs,
                                               "--out", str(w / "bench-demo-tensorrt.json")),
                         needs=("demo-build",), requires=("tensorrt",), result=w / "bench-demo-tensorrt.json"),
        variant(demo_trt, "demo-tensorrt-cudagraph", TRT_CUDA_GRAPH),
        Step("tensorrt-tests", [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_engines.py"],
             requires=("tensorrt",)),
        # SD-1.5 architecture, random weights, 512 px, `classes` classes
        Step("sd15-checkpoint", [sys.executable, "-c", "import sys; from pathlib import Path; from "
                                 "noop_rt.build.shape_fixtures import shape_checkpoint; print(shape_checkpoint("
                                 "'sd15-shape', Path(sys.argv[1]), int(sys.argv[2])))", str(cache), k],
             requires=("torch", "diffusers"),
             prepares=True),
        sd15_torch := Step("sd15-torch", noop("bench", *sd15_bench, "--backends", "torch", "--device", "cuda",
                                              "--fp16", "--runs", runs, "--out", str(w / "bench-sd15-torch.json")),
                           needs=("sd15-checkpoint",), requires=("torch_cuda",), result=w / "bench-sd15-torch.json"),
        variant(sd15_torch, "sd15-torch-cudagraph", TORCH_CUDA_GRAPH),
        Step("train-memory", [sys.executable, "benchmarks/train_memory.py", "--device", "cuda", "--fp16",
                              "--cache-dir", str(cache), "--name", "train_memory_cuda_fp16"],
             requires=("torch_cuda", "diffusers"), result=ROOT / "benchmarks/results/train_memory_cuda_fp16.json",
             skip=None if (ROOT / "benchmarks/train_memory.py").is_file() else "benchmarks/train_memory.py is absent"),
        Step("sd15-export-fp16", noop("export", "--ckpt", str(sd15_ckpt), "--out", str(sd16), "--fp16",
                                      "--images-per-batch", "1", "--min-agreement", "0", "--tolerance", "1", "--force"),
             needs=("sd15-checkpoint",), requires=("torch", "diffusers"), prepares=True),
        sd15_ort := Step("sd15-onnxruntime-cuda", noop("bench", "--bundle", str(sd16), "--ckpt", str(sd15_ckpt),
                                                       "--backends", "onnxruntime", "--device", "cuda", "--no-startup",
                                                       "--runs", runs, "--out",
                                                       str(w / "bench-sd15-onnxruntime.json")),
                         needs=("sd15-export-fp16",), requires=("onnxruntime_cuda",),
                         result=w / "bench-sd15-onnxruntime.json"),
        variant(sd15_ort, "sd15-onnxruntime-cuda-graph", ORT_CUDA_GRAPH),
        Step("sd15-build", noop("build", str(sd16), "--out", str(w / "engines-sd15"), "--timing-cache", str(timing)),
             needs=("sd15-export-fp16",), requires=("tensorrt",), timeout=max(cfg.step_timeout, 480)),
        sd15_trt := Step("sd15-tensorrt", noop("bench", "--bundle", str(sd16), "--ckpt", str(sd15_ckpt), "--backends",
                                               "tensorrt", "--engines", str(w / "engines-sd15"), "--no-startup",
                                               "--runs", runs, "--out", str(w / "bench-sd15-tensorrt.json")),
                         needs=("sd15-build",), requires=("tensorrt",), result=w / "bench-sd15-tensorrt.json"),
        variant(sd15_trt, "sd15-tensorrt-cudagraph", TRT_CUDA_GRAPH),
    ]
    for step in steps:
        if step.skip is not None:
            continue
        if cfg.only and step.name not in cfg.only:
            step.skip = "not in --only"
        elif step.name in cfg.skip:
            step.skip = "--skip"
        else:
            missing = [f for f in step.requires if not facts.get(f)]
            if missing:
                step.skip = "not here: " + ", ".join(FACT_TEXT[f] for f in missing)
    for step in reversed(steps):  # a preparation no running step needs is not worth its minutes
        if step.prepares and step.skip is None and step.name not in cfg.only and not any(
                step.name in other.needs and other.skip is None for other in steps):
            step.skip = "no step that would run here needs it"
    return steps


FACT_TEXT = {"gpu": "no nvidia-smi", "torch": "torch is not importable", "torch_cuda": "torch sees no CUDA GPU",
             "onnxruntime_cuda": "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)",
             "tensorrt": "tensorrt (with polygraphy) is not importable", "diffusers": "diffusers is not importable"}


def setup_steps(cfg: Config) -> list[Step]:
    """Installing carried wheels (`--wheels`): the CPU onnxruntime goes first when onnxruntime-gpu is among them."""
    if cfg.wheels is None:
        return []
    wheels = sorted(str(p) for p in cfg.wheels.glob("*.whl"))
    steps = []
    if any(Path(w).name.startswith("onnxruntime_gpu-") for w in wheels):
        steps.append(Step("setup-remove-cpu-onnxruntime", [sys.executable, "-m", "pip", "uninstall", "-y", "-q",
                                                           "onnxruntime"], timeout=120))
    steps.append(Step("setup-wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                       "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(cfg.site),
                                       *wheels], timeout=300,
                      skip=None if wheels else f"no wheels in {cfg.wheels}"))
    return steps


def child_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    paths = ([str(cfg.site)] if cfg.wheels is not None else []) + [str(ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def probe(cfg: Config, env: dict[str, str]) -> dict[str, bool]:
    """What this machine has (one child process, the steps' environment); `--assume` overrides."""
    facts = {f: False for f in FACTS}
    if not all(f in cfg.assume for f in FACTS):
        try:
            done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180,
                                  cwd=ROOT, check=False)
            facts.update(json.loads(done.stdout.strip().splitlines()[-1]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            print(f"probe failed ({exc}); assuming nothing is here", file=sys.stderr)
    facts.update(cfg.assume)
    return facts


# ----------------------------------------------------------------------------------------------- running
class Suite:
    """Runs steps one by one into `cfg.out` (suite.log, summary.json), within the deadline."""

    def __init__(self, cfg: Config, env: dict[str, str], facts: dict[str, bool], echo: TextIO = sys.stdout) -> None:
        self.cfg, self.env, self.echo = cfg, env, echo
        self.start = time.monotonic()
        self.summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "config": {k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(cfg).items()},
                                        "facts": facts, "steps": []}
        cfg.out.mkdir(parents=True, exist_ok=True)
        cfg.work.mkdir(parents=True, exist_ok=True)
        self.log_path = cfg.out / "suite.log"
        self.status: dict[str, str] = {}

    def remaining(self) -> float:
        return self.cfg.deadline - (time.monotonic() - self.start)

    def run(self, steps: list[Step]) -> dict[str, Any]:
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            for step in steps:
                record = self.run_step(step, log)
                self.status[step.name] = record["status"]
                self.summary["steps"].append(record)
                self.echo.write(f"[{record['status']:>7}] {step.name} ({record.get('seconds', 0):.1f} s)"
                                f"{': ' + record['reason'] if record.get('reason') else ''}\n")
                self.echo.flush()
                self.save()
        self.summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.summary["seconds"] = round(time.monotonic() - self.start, 1)
        self.save()
        return self.summary

    def run_step(self, step: Step, log: TextIO) -> dict[str, Any]:
        record: dict[str, Any] = {"name": step.name, "cmd": command_line(step)}
        if step.env:
            record["env"] = dict(step.env)
        failed = [n for n in step.needs if self.status.get(n) != "ok"]
        reason = step.skip or (f"needs {', '.join(failed)}, which did not succeed" if failed else None)
        left = self.remaining() - 5  # seconds left for this step, keeping a few to write the summary
        timeout = min(step.timeout or self.cfg.step_timeout, left)
        if reason is None and left < 10:
            reason = f"out of time (--deadline {self.cfg.deadline:.0f} s)"
        if reason is not None:
            return {**record, "status": "skipped", "reason": reason}
        log.write(f"\n===== {step.name}: {record['cmd']}\n")
        log.flush()
        offset = log.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(step.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**self.env, **step.env},
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop(proc)
            rc, status = None, "timeout"
        seconds = time.monotonic() - t0
        log.write(f"===== {step.name}: {status} (exit {rc}, {seconds:.1f} s)\n")
        log.flush()
        record.update(status=status, rc=rc, seconds=round(seconds, 1), tail=read_tail(self.log_path, offset))
        if status == "timeout":
            record["reason"] = f"stopped after {timeout:.0f} s"
        if step.result is not None and step.result.is_file():
            try:
                record["result"] = json.loads(step.result.read_text())
            except (OSError, ValueError) as exc:
                record["result_error"] = f"{step.result}: {exc}"
        return record

    def save(self) -> None:
        path = self.cfg.out / "summary.json"
        tmp = path.with_name(".summary.json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        tmp.replace(path)


def command_line(step: Step) -> str:
    """The step as a shell line, its own environment variables first."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in step.env.items()] + [shlex.join(step.cmd)])


def stop(proc: subprocess.Popen) -> None:
    """End a step that ran over its time: its whole process group (it was started in a session of its own)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_tail(path: Path, offset: int, limit: int = 4000) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        fh.seek(max(offset, end - limit))
        return fh.read().decode(errors="replace")


# ----------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> Config:
    names = [s.name for s in plan_steps(Config(Path("."), Path(".")), {})]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="Results folder (default: $OUT, else ./gpu_suite_out).")
    p.add_argument("--work", type=Path, default=Path("/tmp/noop-gpu-suite"), help="Bundles, engines, models.")
    p.add_argument("--wheels", type=Path, default=None, help="Folder of carried wheels to install first.")
    p.add_argument("--site", type=Path, default=Path("/tmp/site"), help="Where --wheels are installed.")
    p.add_argument("--classes", type=int, default=37, help="Classes of the SD-1.5-shape runs.")
    p.add_argument("--runs", type=int, default=20, help="Timed images per bench (p50/p95 over these).")
    p.add_argument("--step-timeout", type=float, default=240.0, help="Seconds per step (default 240).")
    p.add_argument("--deadline", type=float, default=570.0, help="Seconds for the whole suite; steps that cannot "
                   "start in time are skipped (default 570: inside the device's 600 s per call).")
    p.add_argument("--only", default="", help="Comma-separated step names to run.")
    p.add_argument("--skip", default="", help="Comma-separated step names to leave out.")
    p.add_argument("--assume", action="append", default=[], metavar="FACT=yes|no",
                   help=f"Override a probed fact ({', '.join(FACTS)}).")
    p.add_argument("--dry-run", action="store_true", help="Print the steps and their commands; run nothing.")
    a = p.parse_args(argv)
    only, skip = _names(a.only), _names(a.skip)
    unknown = [n for n in only + skip if n not in names]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    assume = {}
    for item in a.assume:
        fact, _, value = item.partition("=")
        if fact not in FACTS or value not in ("yes", "no"):
            p.error(f"--assume {item}: expected FACT=yes|no with FACT one of {', '.join(FACTS)}")
        assume[fact] = value == "yes"
    out = a.out or Path(os.environ.get("OUT") or "gpu_suite_out")
    return Config(out=out, work=a.work, wheels=a.wheels, site=a.site, classes=a.classes, step_timeout=a.step_timeout,
                  deadline=a.deadline, runs=a.runs, only=only, skip=skip, dry_run=a.dry_run, assume=assume)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    env = child_env(cfg)
    setup = setup_steps(cfg)
    if cfg.dry_run:
        facts = probe(cfg, env)
        print(f"# facts{' (before --wheels are installed)' if setup else ''}: {json.dumps(facts)}")
        print(f"# PYTHONPATH={env['PYTHONPATH']}  (cwd {ROOT}; results into {cfg.out}, work in {cfg.work})")
        for step in setup + plan_steps(cfg, facts):
            note = f"  # skip: {step.skip}" if step.skip else (f"  # after {', '.join(step.needs)}" if step.needs
                                                               else "")
            print(f"[{step.name}] {command_line(step)}{note}")
        return 0
    if shutil.which("nvidia-smi") is None:
        print("note: no nvidia-smi here; the GPU steps will be skipped", file=sys.stderr)
    suite = Suite(cfg, env, {})
    if setup:
        suite.run(setup)
    facts = probe(cfg, env)
    suite.summary["facts"] = facts
    summary = suite.run(plan_steps(cfg, facts))
    bad = [s["name"] for s in summary["steps"] if s["status"] in ("failed", "timeout")]
    print(f"summary: {cfg.out / 'summary.json'}, log: {suite.log_path}"
          f"{'; failed: ' + ', '.join(bad) if bad else '; no step failed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
