"""The start-up cost of a fresh `noop-rt classify` process: N whole processes (wall time, peak resident memory), and
one more that times import, open and the first image separately and lists the heavy modules it imported."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from noop_rt.runtime.backends.base import installed
from noop_rt.runtime.errors import BadInputError

STARTUP_RUNS = 5
STARTUP_TARGET_S = 1.0  # runtime-v2: `noop-rt classify seven.png` as a whole process, median of 5
HEAVY_MODULES = ("torch", "diffusers", "transformers", "scipy", "sklearn", "matplotlib", "pandas", "pyarrow", "ray",
                 "openvino", "tensorrt")  # reported when a start-up process imports them


_BREAKDOWN = """\
import json, sys, time
t0 = time.perf_counter()
import noop_rt.cli
from noop_rt.api import load
t1 = time.perf_counter()
args = json.loads(sys.argv[1])
clf = load(args["source"], **args["load"])
t2 = time.perf_counter()
result = clf.classify(args["image"], top_k=5)
t3 = time.perf_counter()
heavy = [m for m in args["heavy"] if m in sys.modules]
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "first_image": t3 - t2, "label": result.label,
                  "backend": clf.backend, "device": clf.device, "torch_imported": "torch" in sys.modules,
                  "heavy_imported": heavy, "modules": len(sys.modules)}))
"""


@dataclass
class ProcessRun:
    wall_s: float
    peak_rss_mb: float | None  # None where the OS gives no per-child rusage
    returncode: int
    stdout: str
    stderr: str


def _rss_mb(maxrss: int) -> float:
    return maxrss / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def run_process(cmd: list[str]) -> ProcessRun:
    """Run `cmd` to completion: wall seconds (spawn to exit) and the child's own peak resident memory (os.wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        rss: float | None = None
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                rss = _rss_mb(usage.ru_maxrss)
            else:
                proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ProcessRun(wall, rss, int(proc.returncode), out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))


def _failed(what: str, run: ProcessRun) -> BadInputError:
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    return BadInputError(f"start-up {what} failed (exit {run.returncode}): {lines[-1] if lines else 'no message'}")


def classify_command(image: Path, source: Path | None = None, device: str = "auto",
                     engines: Path | None = None) -> list[str]:
    """`python -m noop_rt classify IMAGE [--bundle DIR | --ckpt PT] --json` (no source: the built-in demo)."""
    cmd = [sys.executable, "-m", "noop_rt", "classify", str(image)]
    if source is not None:
        cmd += ["--ckpt" if source.suffix == ".pt" else "--bundle", str(source)]
    if device != "auto":
        cmd += ["--device", device]
    if engines is not None:
        cmd += ["--engines", str(engines)]
    return [*cmd, "--json"]


def _short(arg: str) -> str:
    """A path argument relative to the working directory when it lies under it (for display)."""
    path = Path(arg)
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return arg
    return arg


def measure_startup(image: Path, source: Path | None = None, *, runs: int = STARTUP_RUNS, device: str = "auto",
                    engines: Path | None = None, log: IO[str] = sys.stderr) -> dict[str, Any]:
    """Wall time and peak RSS of `runs` fresh `noop-rt classify IMAGE --json` processes, and the import / open /
    first-image breakdown from one more fresh process. Raises BadInputError if a process fails."""
    if runs < 1:
        raise BadInputError("start-up runs must be >= 1")
    image = Path(image).expanduser().resolve()
    if not image.is_file():
        raise BadInputError(f"image not found: {image}")
    source = None if source is None else Path(source).expanduser().resolve()
    cmd = classify_command(image, source, device, engines)
    walls: list[float] = []
    rss: list[float] = []
    answer: dict[str, Any] = {}
    for i in range(runs):
        run = run_process(cmd)
        if run.returncode != 0:
            raise _failed("run of `noop-rt classify`", run)
        walls.append(run.wall_s)
        if run.peak_rss_mb is not None:
            rss.append(run.peak_rss_mb)
        if i == 0:
            try:
                answer = json.loads(run.stdout)[0]
            except (ValueError, IndexError, KeyError, TypeError):
                raise BadInputError(f"start-up run printed no classify JSON: {run.stdout[:200]!r}") from None
        print(f"  start-up run {i + 1}/{runs}: {run.wall_s:.2f} s"
              f"{f', peak RSS {run.peak_rss_mb:.0f} MB' if run.peak_rss_mb is not None else ''}", file=log)
    load_args = {"device": device, **({"engines": str(engines)} if engines is not None else {})}
    payload = json.dumps({"source": None if source is None else str(source), "image": str(image),
                          "load": load_args, "heavy": list(HEAVY_MODULES)})
    run = run_process([sys.executable, "-c", _BREAKDOWN, payload])
    if run.returncode != 0:
        raise _failed("breakdown process", run)
    try:
        parts = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BadInputError(f"start-up breakdown printed no JSON: {run.stdout[:200]!r}") from None
    breakdown = {k: parts[k] for k in ("import", "open", "first_image")}
    breakdown["interpreter_and_exit"] = max(0.0, run.wall_s - sum(breakdown.values()))
    median = statistics.median(walls)
    shown = " ".join("python" if c == sys.executable else _short(c) for c in cmd)
    return {"command": shown, "image": str(image), "runs": runs, "wall_s": walls, "median_s": median,
            "peak_rss_mb": max(rss) if rss else None, "rss_mb": rss, "target_s": STARTUP_TARGET_S,
            "meets_target": median <= STARTUP_TARGET_S, "breakdown_s": breakdown,
            "breakdown_wall_s": run.wall_s, "breakdown_peak_rss_mb": run.peak_rss_mb,
            "torch_imported": bool(parts["torch_imported"]), "torch_importable": installed("torch"),
            "heavy_imported": list(parts["heavy_imported"]), "modules_imported": parts["modules"],
            "backend": answer.get("backend", parts.get("backend")), "device": parts.get("device"),
            "label": answer.get("top", [{}])[0].get("class")}


def startup_line(s: dict[str, Any]) -> str:
    b = s["breakdown_s"]
    rss = f", peak RSS {s['peak_rss_mb']:.0f} MB" if s.get("peak_rss_mb") is not None else ""
    return (f"start-up ({s['command']}, {s['backend']}): median {s['median_s']:.2f} s of {s['runs']} fresh processes"
            f"{rss}; import {b['import']:.2f} s, open {b['open']:.2f} s, "
            f"first image {b['first_image']:.2f} s, interpreter+exit {b['interpreter_and_exit']:.2f} s; torch "
            f"{'imported' if s['torch_imported'] else 'not imported'}")


