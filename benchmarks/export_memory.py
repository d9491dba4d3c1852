"""Memory and time of `noop-rt export`, and of opening the exported bundle and classifying one image.

    python benchmarks/export_memory.py [--models demo,sd15-shape,sdxl-shape] [--precisions fp32,fp16]
                                       [--classes 2] [--validate-images 2] [--cache-dir DIR]
                                       [--name export_memory] [--out DIR]
    # writes DIR/NAME.{md,json} (DIR defaults to benchmarks/results)

Per model and precision, three fresh child processes, each measured from outside by `os.wait4` (the child's own
peak resident set size, Linux `ru_maxrss`): (1) `export_bundle` of a NoOp checkpoint (a random learned noise and
meta-net on the model) into a new bundle, the same code as `noop-rt export`, validation included; the child also
records its resident memory and peak after each step the export logs, so the table says which step peaks;
(2) `noop_rt.load(bundle, backend="onnxruntime")` and `classify` of one image (the NoOp classifier graph); (3) the
same on OpenVINO. `demo` is the shipped 16 px demo checkpoint; `sd15-shape` the SD-1.5 architecture (512 px) and
`sdxl-shape` an SDXL-sized stand-in (1024 px), both random weights (`noop_rt/build/shape_fixtures.py`, built once
and cached): memory and time do not depend on the weights. Targets are those of the issue this benchmark answers
(SD-1.5 fp32 export peak <= 2x the fp32 weights, fp16 <= 2x the fp16 weights, opening + one image <= 1.3x the
bundle's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def _status_gib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 2**20


class PhaseLog:
    """A log stream that stamps every line the export prints with the time, resident memory and peak so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: list[dict[str, Any]] = []
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line.strip():
                self.phases.append({"s": round(time.perf_counter() - self.start, 1), "line": line.strip(),
                                    "rss_gib": round(_status_gib("VmRSS"), 3),
                                    "peak_gib": round(_status_gib("VmHWM"), 3)})
                print(f"[{self.phases[-1]['s']:>7.1f} s rss {self.phases[-1]['rss_gib']:.2f} peak "
                      f"{self.phases[-1]['peak_gib']:.2f} GiB] {line.strip()}", file=sys.stderr, flush=True)
        return len(text)

    def flush(self) -> None:
        pass


def child_export(ckpt: str, out: str, precision: str, validate: list[str]) -> None:
    from noop_rt.build.export import ExportOptions, export_bundle

    log = PhaseLog()
    log.write("start (imports done)\n")
    options = ExportOptions(precision=precision, images_per_batch=1, min_agreement=0.0, force=True,
                            validate_images=[Path(p) for p in validate])
    start = time.perf_counter()
    report = export_bundle(ckpt, out, options, log=log)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 1), "phases": log.phases, "validation_passed":
                      report.validation["passed"], "graphs": {k: v["max_rel"] for k, v in
                                                             report.validation["graphs"].items()}}))


def child_classify(bundle: str, backend: str, image: str) -> None:
    import numpy as np

    import noop_rt

    backend, _, mode = backend.partition(":")  # onnxruntime:mapped -> NOOP_RT_ORT_WEIGHTS=mapped
    if mode:
        os.environ["NOOP_RT_ORT_WEIGHTS"] = mode
    start = time.perf_counter()
    model = noop_rt.load(bundle, backend=backend, device="cpu")
    opened = time.perf_counter() - start
    rss_open = _status_gib("VmRSS")
    t0 = time.perf_counter()
    result = model.classify(image)
    first = time.perf_counter() - t0
    label = result.label if hasattr(result, "label") else str(result)
    model.close()
    print(json.dumps({"open_s": round(opened, 2), "classify_s": round(first, 2), "rss_after_open_gib":
                      round(rss_open, 3), "label": label, "numpy": np.__version__}))


def run_child(args: list[str], log_path: Path) -> tuple[dict[str, Any], float, float]:
    """Run this script as a child; returns its last JSON line, its own peak RSS in GiB (`os.wait4`: the child's
    ru_maxrss, not its siblings') and wall seconds."""
    start = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = log_path.read_text().strip().splitlines()
        result = {"error": tail[-1] if tail else f"exit {proc.returncode}"}
    if proc.returncode:
        result.setdefault("error", f"exit {proc.returncode}")
    return result, usage.ru_maxrss / 2**20, wall


def child_prepare(name: str, cache_dir: str, classes: int) -> None:
    """The checkpoint (and model folder) of `name`, built once and cached; prints their paths and weight sizes."""
    from noop_rt.demo import CKPT_PATH, DEMO_DIR

    if name == "demo":
        ckpt, folder = CKPT_PATH, DEMO_DIR / "model"
    else:
        from noop_rt.build.shape_fixtures import shape_checkpoint

        ckpt = shape_checkpoint(name, Path(cache_dir).expanduser(), classes)
        folder = Path(cache_dir).expanduser() / name
    weights = {part.name: sum(f.stat().st_size for f in part.glob("*.safetensors"))
               for part in sorted(folder.iterdir()) if part.is_dir()}
    print(json.dumps({"ckpt": str(ckpt), "model_dir": str(folder), "fp32_weights_bytes": weights}))


def bundle_sizes(bundle: Path) -> dict[str, int]:
    files = [p for p in bundle.rglob("*") if p.is_file()]
    return {"bundle_bytes": sum(p.stat().st_size for p in files),
            "weights_bin_bytes": (bundle / "weights.bin").stat().st_size}


def validation_images(folder: Path, resolution_hint: int, count: int) -> list[str]:
    """`count` uniform-noise PNGs (the export resizes them to the model's resolution)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"noise{i}.png"
        if not path.is_file():
            Image.fromarray(rng.integers(0, 256, (resolution_hint, resolution_hint, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def measure(model: str, precision: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    prep, _, _ = run_child(["--child", "prepare", model, str(args.cache_dir), str(args.classes)],
                           logs / f"{model}-prepare.log")
    if "error" in prep:
        return {"error": f"preparing the model: {prep['error']}"}
    row: dict[str, Any] = {"model": model, "precision": precision, **prep}
    bundle = args.cache_dir.expanduser() / "export-memory" / f"{model}-{precision}"
    shutil.rmtree(bundle, ignore_errors=True)
    images = [] if model == "demo" else validation_images(logs / "images", 512, args.validate_images)
    print(f"{model} {precision}: export …", file=sys.stderr, flush=True)
    result, peak, wall = run_child(["--child", "export", prep["ckpt"], str(bundle), precision, *images],
                                   logs / f"{model}-{precision}-export.log")
    row["export"] = {**result, "peak_rss_gib": round(peak, 3), "wall_s": round(wall, 1)}
    if "error" in result:
        return row
    row.update(bundle_sizes(bundle))
    example = str(Path(__file__).resolve().parent.parent / "noop_rt" / "demo" / "examples" / "seven.png")
    for backend in args.backends:
        print(f"{model} {precision}: open + classify one image on {backend} …", file=sys.stderr, flush=True)
        result, peak, wall = run_child(["--child", "classify", str(bundle), backend, example],
                                       logs / f"{model}-{precision}-{backend}.log")
        row[backend] = {**result, "peak_rss_gib": round(peak, 3), "wall_s": round(wall, 1)}
    if not args.keep:
        shutil.rmtree(bundle, ignore_errors=True)
    return row


def table(rows: list[dict[str, Any]], backends: list[str]) -> list[str]:
    head = ["model", "precision", "model weights (fp32, all parts)", "bundle weights.bin", "export wall",
            "export peak RSS", "peak / weights.bin", "peak step"]
    for b in backends:
        head += [f"{b}: open + 1 image peak RSS", f"{b}: peak / weights.bin", f"{b}: open, classify s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "export" not in r or "error" in r.get("export", {}):
            why = r.get("error") or r.get("export", {}).get("error")
            lines.append(f"| {r.get('model')} | {r.get('precision')} | failed: {why} |" + " |" * (len(head) - 3))
            continue
        weights = sum(r["fp32_weights_bytes"].values()) / GIB
        wbin = r["weights_bin_bytes"] / GIB
        e = r["export"]
        top = max(e["phases"], key=lambda p: p["peak_gib"]) if e.get("phases") else None
        # the step at whose end the peak was first reached
        step = next((p["line"] for p in e.get("phases", []) if top and p["peak_gib"] >= top["peak_gib"]), "")
        cells = [r["model"], r["precision"], f"{weights:.2f} GiB", f"{wbin:.2f} GiB", f"{e['wall_s']:.0f} s",
                 f"{e['peak_rss_gib']:.2f} GiB", f"{e['peak_rss_gib'] / wbin:.2f}x", step[:60].replace("|", "/")]
        for b in backends:
            c = r.get(b, {})
            if "error" in c or not c:
                cells += [f"failed: {c.get('error', 'not run')}", "", ""]
            else:
                cells += [f"{c['peak_rss_gib']:.2f} GiB", f"{c['peak_rss_gib'] / wbin:.2f}x",
                          f"{c['open_s']:.1f}, {c['classify_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo,sd15-shape", help="demo, sd15-shape, sdxl-shape (comma list)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--backends", default="onnxruntime,onnxruntime:mapped,openvino",
                        help="onnxruntime:MODE sets NOOP_RT_ORT_WEIGHTS=MODE (packed, mapped)")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--validate-images", type=int, default=2, help="synthetic validation images (shape models)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/noop-rt"))
    parser.add_argument("--keep", action="store_true", help="keep the bundles (in CACHE_DIR/export-memory)")
    parser.add_argument("--name", default="export_memory")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "prepare":
            child_prepare(rest[0], rest[1], int(rest[2]))
        elif kind == "export":
            child_export(rest[0], rest[1], rest[2], rest[3:])
        else:
            child_classify(rest[0], rest[1], rest[2])
        return
    args.backends = [b for b in args.backends.split(",") if b]
    logs = args.cache_dir.expanduser() / "export-memory" / f"{args.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for model in [m for m in args.models.split(",") if m]:
        for precision in [p for p in args.precisions.split(",") if p]:
            rows.append(measure(model, precision, args, logs))
            write_results(rows, args)  # after every row: a run stopped early keeps what it measured


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import onnxruntime
    import torch

    from noop_rt.jobs.accuracy import command_line, protocol_lines

    protocol = {"models": args.models, "precisions": args.precisions, "classes": args.classes,
                "validate_images": args.validate_images, "backends": args.backends, "images_per_batch": 1,
                "measurement": "one fresh child process per step; peak = the child's ru_maxrss from os.wait4 "
                               "(resident set high-water mark, file-backed pages included); per-step RSS/peak from "
                               "/proc/self/status at each line the export logs"}
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "rows": rows, "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Export memory: `noop-rt export`, then opening the bundle and classifying one image", "",
             f"Produced by `{command_line('export_memory.py')}` on a {out['cpus']}-core CPU machine with "
             f"{out['memory_gib']} GiB (torch {torch.__version__}, onnxruntime {onnxruntime.__version__}). "
             "Each figure is one fresh child process; peak RSS is its resident high-water mark (`ru_maxrss` via "
             "`os.wait4`). Export includes validation against PyTorch fp32 "
             f"({'the demo examples' if 'demo' in args.models else ''}"
             f"{', ' if 'demo' in args.models else ''}{args.validate_images} synthetic images for the shape models). "
             "`peak step` is the export log line at whose end the peak had been reached.", ""]
    lines += table(rows, args.backends)
    lines += protocol_lines(protocol)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
