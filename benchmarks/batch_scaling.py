"""Images/s of `noop-rt batch` in process vs on Ray Data with 1 and 2 workers, on the demo bundle.

    python benchmarks/batch_scaling.py [--images 720] [--quick] [--out DIR]   # writes DIR/batch_scaling.{md,json}

Inputs: the demo's held-out digits written as PNGs (repeated to --images paths). Each configuration starts from an
empty output; Ray timings include starting the local cluster and the actors (what a user waits for), and the
per-image overhead Ray adds is (t_ray - t_in_process) / images. `--quick` (40 images, batch 8) only proves the
script runs end to end. DIR defaults to benchmarks/results.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import noop_rt
from noop_rt.api import LoadOptions
from noop_rt.demo import BUNDLE_DIR
from noop_rt.demo.digits import write_image_folders
from noop_rt.jobs.accuracy import command_line, model_protocol, protocol_lines, strategy_protocol
from noop_rt.jobs.batch import BatchOptions, run_batch
from noop_rt.jobs.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
LOAD = {"source": BUNDLE_DIR, "backend": "onnxruntime", "device": "cpu"}  # noop_rt.load arguments of every mode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=720)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images, batch 8")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size = 40, 8
    with noop_rt.load(**LOAD) as clf:  # what every mode opens: recorded, not timed
        protocol = {"data": {"set": "the demo's held-out digits as PNGs (noop-rt demo-data DIR: DIR/test), copied to "
                                    f"{args.images} distinct paths (cycling), listed in a .txt file",
                             "images": args.images},
                    "load": {k: str(v) for k, v in LOAD.items()},
                    "models": {"bundle": model_protocol(clf, args.images)},
                    "runs": {"batch": {"model": "bundle", **strategy_protocol(clf), "batch_size": args.batch_size,
                                       "top_k": BatchOptions().top_k}}}
    tmp = Path(tempfile.mkdtemp())
    try:
        write_image_folders(tmp / "digits")
        pngs = sorted((tmp / "digits" / "test").rglob("*.png"))
        listing = tmp / "paths.txt"
        copies = []
        for i in range(args.images):  # distinct paths (copies) so every one is classified
            src = pngs[i % len(pngs)]
            dst = tmp / "inputs" / f"{i:05d}.png"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dst)
            copies.append(str(dst))
        listing.write_text("\n".join(copies) + "\n")
        rows = []
        for name, options in (("in process", BatchOptions(batch_size=args.batch_size)),
                              ("Ray, 1 worker", BatchOptions(batch_size=args.batch_size, ray=True, workers=1)),
                              ("Ray, 2 workers", BatchOptions(batch_size=args.batch_size, ray=True, workers=2))):
            out = tmp / f"out-{len(rows)}.parquet"
            t0 = time.perf_counter()
            report = run_batch([str(listing)], out, LoadOptions.of(**LOAD), options, log=io.StringIO(),
                               show_progress=False)
            seconds = time.perf_counter() - t0
            if report.classified != args.images:
                raise SystemExit(f"error: {name}: {report.classified} of {args.images} images classified "
                                 f"(first error: {report.first_error})")
            rows.append({"mode": name, "images": report.total, "seconds": seconds,
                         "images_per_s": report.total / seconds})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["overhead_ms_per_image"] = 1e3 * (r["seconds"] - base) / r["images"]
    out = {"machine": machine_info(), "rows": rows, "batch_size": args.batch_size, "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# `noop-rt batch` scaling ({args.images} demo images, onnxruntime CPU, batch {args.batch_size})", "",
             f"Produced by `{command_line('batch_scaling.py')}` on {out['machine']['cpu']} "
             f"({out['machine']['cpu_count']} cores). Wall time includes model/cluster start-up.", "",
             "| mode | seconds | images/s | overhead vs in process (ms/image) |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {r['overhead_ms_per_image']:.1f} |"
              for r in rows]
    lines += protocol_lines(protocol)
    (args.out / "batch_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
