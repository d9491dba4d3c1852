"""Images/s of `noop-rt batch` on the demo bundle: in process (one call at a time, the old default; calls in flight,
the new default; other plans), on Ray Data with 1 and 2 workers, and a worker node lost mid-job; start-up and steady
state apart, and CPU time per image by process.

    python benchmarks/batch_scaling.py [--images 2000] [--quick] [--out DIR]  # DIR/batch_scaling.{md,json,png}

Inputs: the demo's held-out digits written as PNGs, copied to --images distinct paths. Each configuration starts from
an empty output. Start-up: in process, opening the model(s) and the first batch back; on Ray, starting the local
cluster, then the actor pool (actor start + model load) and the first block back. Steady state: images/s after the
first batch/block came back (the rest of the job). CPU time per image: every process's CPU time (psutil) over the run,
split into this process (the driver, and in process the engine), its descendants (the local Ray cluster's `ray::`
workers, and Ray's daemons: raylet, gcs_server, ...) and everything else on the machine (other work: the load).
`--quick` (120 images) only proves the script runs end to end. The node-loss line comes from
benchmarks/node_loss.py's drill (300 images, 3 one-CPU worker nodes)."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import noop_rt
from noop_rt.api import LoadOptions
from noop_rt.demo import BUNDLE_DIR
from noop_rt.jobs.accuracy import command_line, model_protocol, protocol_lines, strategy_protocol
from noop_rt.jobs.batch import BatchOptions, read_rows, run_batch
from noop_rt.jobs.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
LOAD = {"source": BUNDLE_DIR, "device": "cpu"}  # noop_rt.load arguments of every mode (backend per mode)


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (group, CPU seconds so far)} of every process: this one (the driver, and in process the engine), its
    descendants (a local Ray cluster: `ray::` workers, and Ray's daemons), and everything else (other work)."""
    import psutil

    me = psutil.Process()
    mine = {p.pid for p in me.children(recursive=True)}
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        times = proc.info.get("cpu_times")
        if times is None:
            continue
        pid = proc.info["pid"]
        cmd = " ".join(proc.info.get("cmdline") or [])
        group = ("driver" if pid == me.pid else "other" if pid not in mine
                 else "ray_workers" if cmd.startswith("ray::") else "ray_daemons")
        out[pid] = (group, times.user + times.system)
    return out


class CpuSampler(threading.Thread):
    """CPU seconds per group over a run: every process sampled every 0.25 s, so processes that end during the run
    (a local Ray cluster's) count up to their last sample."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first = cpu_by_process()
        self.last = dict(self.first)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.last.update(cpu_by_process())

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        self.last.update(cpu_by_process())
        out = {"driver": 0.0, "ray_workers": 0.0, "ray_daemons": 0.0, "other": 0.0}
        for pid, (group, seconds) in self.last.items():
            out[group] += seconds - self.first.get(pid, (group, 0.0))[1]
        return out


def run_mode(name: str, backend: str, options: BatchOptions, listing: Path, out: Path, images: int) \
        -> dict[str, Any]:
    sampler = CpuSampler()
    sampler.start()
    load0, t0 = os.getloadavg(), time.perf_counter()
    report = run_batch([str(listing)], out, LoadOptions.of(backend=backend, **LOAD), options, log=io.StringIO(),
                       show_progress=False)
    seconds = time.perf_counter() - t0
    used, load1 = sampler.stop(), os.getloadavg()
    if report.classified != images:
        raise SystemExit(f"error: {name}: {report.classified} of {images} images classified "
                         f"(first error: {report.first_error})")
    engine = report.engine or {}
    startup = (engine.get("cluster_start_s") or 0.0) + (engine.get("model_load_s") or 0.0) + \
        (engine.get("first_rows_s") or 0.0)
    cpu = {k: 1e3 * max(0.0, v) / images for k, v in used.items()}
    return {"mode": name, "backend": backend, "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "startup_s": startup,
            "steady_images_per_s": engine.get("steady_images_per_s"), "cpu_ms_per_image": cpu,
            "loadavg_1m": [load0[0], load1[0]], "engine": engine}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--node-loss-images", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="smoke run: 120 images, no node loss")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images, args.node_loss_images = 120, 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("node_loss", Path(__file__).resolve().parent / "node_loss.py")
    drill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drill)
    with noop_rt.load(backend="onnxruntime", **LOAD) as clf:  # what every mode opens: recorded, not timed
        protocol = {"data": {"set": "the demo's held-out digits as PNGs (noop-rt demo-data DIR: DIR/test), copied to "
                                    f"{args.images} distinct paths (cycling), listed in a .txt file",
                             "images": args.images},
                    "load": {k: str(v) for k, v in LOAD.items()},
                    "models": {"bundle": model_protocol(clf, args.images)},
                    "runs": {"batch": {"model": "bundle", **strategy_protocol(clf), "batch_size": args.batch_size,
                                       "top_k": BatchOptions().top_k}}}
    b = args.batch_size
    modes = [("in process, one call at a time (old default)", "onnxruntime", BatchOptions(batch_size=b, concurrency=1)),
             ("in process, calls in flight (new default)", "onnxruntime", BatchOptions(batch_size=b)),
             ("in process, 1 call, 2 threads not spinning", "onnxruntime",
              BatchOptions(batch_size=b, concurrency=1, threads=2)),
             ("in process, OpenVINO, one call at a time", "openvino", BatchOptions(batch_size=b, concurrency=1)),
             ("in process, OpenVINO, calls in flight (default)", "openvino", BatchOptions(batch_size=b)),
             ("Ray, 1 worker", "onnxruntime", BatchOptions(batch_size=b, ray=True, workers=1)),
             ("Ray, 2 workers", "onnxruntime", BatchOptions(batch_size=b, ray=True, workers=2))]
    tmp = Path(tempfile.mkdtemp())
    rows: list[dict[str, Any]] = []
    node_loss: dict[str, Any] | None = None
    try:
        listing, _ = drill.demo_inputs(tmp, args.images)
        outputs = []
        for name, backend, options in modes:
            out = tmp / f"out-{len(rows)}.parquet"
            rows.append(run_mode(name, backend, options, listing, out, args.images))
            outputs.append(out)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "engine"}), flush=True)
        references = {}  # per engine: its one-call-at-a-time rows
        for row, out in zip(rows, outputs, strict=True):
            reference = references.setdefault(row["backend"], {r["path"]: r for r in read_rows(out)})
            row["rows_different_from_one_call"] = drill.same_rows(read_rows(out), reference)
        if args.node_loss_images:
            nl_listing, nl_paths = drill.demo_inputs(tmp / "node-loss", args.node_loss_images)
            nl_ref = tmp / "node-loss-ref.parquet"
            run_batch([str(nl_listing)], nl_ref, LoadOptions.of(backend="onnxruntime", **LOAD),
                      BatchOptions(batch_size=b), log=io.StringIO(), show_progress=False)
            ref = {r["path"]: r for r in read_rows(nl_ref)}
            cluster = drill.start_cluster(3)
            try:
                node_loss = drill.drill(cluster, nl_listing, nl_paths, tmp / "node-loss",
                                        LoadOptions.of(backend="onnxruntime", **LOAD),
                                        BatchOptions(batch_size=b, ray=True, workers=2, ray_block_size=16), 2, ref)
            finally:
                drill.stop_cluster(cluster)
            print(json.dumps(node_loss), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(args, rows, node_loss, protocol)


def write_results(args: argparse.Namespace, rows: list[dict[str, Any]], node_loss: dict[str, Any] | None,
                  protocol: dict[str, Any]) -> None:
    old, new = rows[0]["steady_images_per_s"], rows[1]["steady_images_per_s"]
    ray1, ray2 = rows[5]["steady_images_per_s"], rows[6]["steady_images_per_s"]
    ratios = {"new_vs_old_in_process_steady": new / old, "ray_1_worker_vs_new_in_process_steady": ray1 / new,
              "ray_2_workers_vs_in_process_1_call_steady": ray2 / old}
    out = {"machine": machine_info(), "command": command_line("batch_scaling.py"), "images": args.images,
           "batch_size": args.batch_size, "rows": rows, "ratios": ratios, "node_loss": node_loss,
           "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    loads = [v for r in rows for v in r["loadavg_1m"]]
    lines = [f"# `noop-rt batch` scaling ({args.images} demo images, CPU, batch {args.batch_size})", "",
             f"Produced by `{out['command']}` on {out['machine']['cpu']} ({out['machine']['cpu_count']} cores). "
             f"Machine load (1-min load average at the start and end of each run): {min(loads):.1f} to "
             f"{max(loads):.1f}; the CPU time of other processes during each run is the `other` column.", "",
             "| mode | plan | start-up s | steady images/s | overall images/s | CPU ms/image: driver / Ray workers / "
             "Ray daemons / other | rows ≠ the engine's one call at a time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["engine"]
        if e.get("mode") == "ray":
            p = e["plan_per_worker"]
            plan = (f"{e['workers']} actor(s) x {e['actor_cpus']:g} CPU, {p['concurrency']} call(s) x "
                    f"{p['threads']} thread(s) each, blocks of {e['block_size']}")
        else:
            plan = (f"{e['concurrency']} call(s) x {e['threads'] or 'engine default'} thread(s), {e['sessions']} "
                    "session(s)")
        c = r["cpu_ms_per_image"]
        lines.append(f"| {r['mode']} | {plan} | {r['startup_s']:.1f} | {r['steady_images_per_s']:.1f} | "
                     f"{r['images_per_s']:.1f} | {c['driver']:.1f} / {c['ray_workers']:.1f} / {c['ray_daemons']:.1f} "
                     f"/ {c['other']:.1f} | {r['rows_different_from_one_call']} |")
    lines += ["", "Steady state, measured in this run: in process, new default vs old default "
              f"**{ratios['new_vs_old_in_process_steady']:.2f}x** (target >= 1.3); Ray 1 worker vs new in process "
              f"**{100 * ratios['ray_1_worker_vs_new_in_process_steady']:.0f} %** (target >= 85 %); Ray 2 workers vs "
              f"in process one call at a time **{ratios['ray_2_workers_vs_in_process_1_call_steady']:.2f}x** "
              "(target >= 1).", ""]
    for r in rows:
        e = r["engine"]
        if e.get("mode") == "ray":
            lines.append(f"- {r['mode']}: cluster start {e['cluster_start_s']:.1f} s, actor pool + model load + "
                         f"first block {e['first_rows_s']:.1f} s; model load per actor "
                         + ", ".join(f"{w['model_load_s']:.2f} s" for w in e["workers_seen"].values())
                         + "; CPU per image in each actor's calls "
                         + ", ".join(f"{w['cpu_ms_per_image']:.1f} ms" for w in e["workers_seen"].values()))
    if node_loss:
        k = node_loss["killed"] or {}
        lines += ["", f"Node lost mid-job (benchmarks/node_loss.py drill: {node_loss['images']} images, Ray, "
                  f"{node_loss['workers']} workers on {node_loss['nodes']} one-CPU worker nodes; the node of one "
                  f"actor killed after {k.get('rows_back', '?')} rows were back): finished "
                  f"{'yes' if node_loss['finished'] else 'NO'} in {node_loss['seconds']:.1f} s (undisturbed "
                  f"{node_loss['undisturbed_seconds']:.1f} s); rows missing {node_loss['missing']}, duplicated "
                  f"{node_loss['duplicated']} (rows Ray delivered: {node_loss['rows_received_from_ray']}), different "
                  f"from in process {node_loss['different_from_in_process']}, different from the undisturbed run "
                  f"{node_loss['different_from_undisturbed']}."]
    lines += protocol_lines(protocol)
    (args.out / "batch_scaling.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, args.out / "batch_scaling.png")
    print("\n".join(lines[:16]))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["mode"].replace(", ", "\n", 1) for r in rows]
    y = list(range(len(rows)))
    a.barh(y, [r["steady_images_per_s"] for r in rows], color="tab:blue")
    a.set_yticks(y, names, fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("steady-state images/s")
    b.barh(y, [r["startup_s"] for r in rows], color="tab:orange")
    b.set_yticks(y, [""] * len(rows))
    b.invert_yaxis()
    b.set_xlabel("start-up s (cluster, model load, first batch)")
    fig.suptitle("noop-rt batch on the demo bundle (benchmarks/results/batch_scaling.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
