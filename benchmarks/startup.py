"""Start-up cost of `noop-rt classify seven.png --json` as a whole process (runtime-v2 target: <= 1.0 s wall, median
of 5 fresh processes), its peak resident memory, and where the time goes (import / open / first image).

    python benchmarks/startup.py [--runs 5] [--bundle DIR | --ckpt PT] [--image PNG]
    # writes benchmarks/results/startup.{md,json}

Each run is a fresh `python -m noop_rt classify IMAGE --json` process (no source: the built-in demo bundle), timed
from spawn to exit; peak RSS is the child's own (os.wait4). One more fresh process (`python -c`) times importing the
CLI and API, `noop_rt.load` and the first `classify` separately, and reports whether torch was imported. The runs
follow each other, so all but the first find the files in the OS page cache (what a user's second command sees).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from noop_rt.demo import EXAMPLES_DIR
from noop_rt.jobs.bench import machine_info
from noop_rt.jobs.startup import STARTUP_RUNS, measure_startup
from noop_rt.runtime.bundle import write_json_atomic
from noop_rt.runtime.errors import NoopError

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(record: dict[str, Any]) -> str:
    s, m = record["startup"], record["machine"]
    b = s["breakdown_s"]
    verdict = "met" if s["meets_target"] else "NOT met"
    rss = f"{s['peak_rss_mb']:.0f} MB" if s["peak_rss_mb"] is not None else "not available on this OS"
    walls = ", ".join(f"{w:.3f}" for w in s["wall_s"])
    heavy = ", ".join(s["heavy_imported"]) or "none"
    lines = [
        f"# Start-up: `{s['command']}` as a whole process",
        "",
        f"Measured {record['date']} by `python benchmarks/startup.py --runs {s['runs']}` on {m['cpu']} "
        f"({m['cpu_count']} cores), Python {m['python']}, onnxruntime {m['onnxruntime']}, openvino {m['openvino']}. "
        "Fresh processes one after the other (the OS page cache is warm after the first).",
        "",
        "| | |",
        "|---|---|",
        f"| wall time, median of {s['runs']} fresh processes | **{s['median_s']:.3f} s** (target <= "
        f"{s['target_s']:.1f} s: {verdict}) |",
        f"| each run (s) | {walls} |",
        f"| peak resident memory (largest run) | {rss} |",
        f"| backend, device | {s['backend']}, {s['device']} |",
        f"| torch installed in this environment | {'yes' if s['torch_importable'] else 'no'} |",
        f"| torch imported by the process | {'yes' if s['torch_imported'] else 'no'} |",
        f"| heavy modules imported | {heavy} |",
        "",
        "Breakdown (one more fresh process running the same steps through the Python API):",
        "",
        "| stage | s |",
        "|---|---|",
        f"| interpreter start + exit | {b['interpreter_and_exit']:.3f} |",
        f"| import noop_rt.cli, noop_rt.api | {b['import']:.3f} |",
        f"| open (`noop_rt.load`) | {b['open']:.3f} |",
        f"| first image (`classify`) | {b['first_image']:.3f} |",
        f"| whole process | {s['breakdown_wall_s']:.3f} |",
        "",
    ]
    return "\n".join(lines)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=STARTUP_RUNS, help="fresh processes timed (median reported)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="bundle folder (default: the built-in demo)")
    source.add_argument("--ckpt", type=Path, help="checkpoint NAME.pt (torch backend)")
    parser.add_argument("--image", type=Path, default=EXAMPLES_DIR / "seven.png")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engines", type=Path, help="TensorRT engine folder")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="startup", help="result file stem")
    args = parser.parse_args()
    try:
        startup = measure_startup(args.image, args.bundle or args.ckpt, runs=args.runs, device=args.device,
                                  engines=args.engines)
    except NoopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    record = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "startup": startup}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / f"{args.name}.json", record)
    text = markdown(record)
    write_text_atomic(args.out_dir / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
