"""Load test of `noop-rt serve` on loopback, against in-process `batch` on the same images.

    python benchmarks/serve_load.py [--images 400] [--concurrency 1,4,16,64] [--replicas 1] [--quick] [--out DIR]
    # writes DIR/serve_load.{md,json,png}

1. In process (no server running): `noop-rt batch` (run_batch, batch 16) over the N images gives the images/s to
   beat, and `classify` one image at a time gives the single-image latency; the first run also classifies every
   distinct image for the reference top-1. Both with the engine's default threads (as `noop-rt batch` runs) and,
   when they differ, with the threads a server replica gets (`replica_resources`), so that the serving overhead can
   be told from the thread setting.
2. For each concurrency level, a fresh `noop-rt serve` in a child process (a local Ray cluster, --port 0), and an
   asyncio + httpx client that keeps that many requests in flight (each a raw PNG body to POST /v1/classify) until
   all N are answered: throughput, p50/p95/p99 latency (client wall time), errors (non-200 or no answer: must be 0),
   answers whose top-1 differs from the in-process one (must be 0), the mean batch size and queue time the server
   reports, and the CPU time per request by process. Then the server is stopped (SIGTERM: it must exit 0) and step
   1 runs again: each level is compared with the mean of the in-process runs right before and right after it, as
   this machine's speed drifts by tens of percent between minutes.
3. Overhead per image = 1000 / serve images/s - 1000 / batch images/s with the same engine threads (ms).
   Targets (issue 19): no request lost or wrong; at concurrency 16, >= 80 % of in-process batch images/s; p99 at
   concurrency 1 <= 2x the in-process single-image latency (median). The exit code is 1 when a request was lost or
   wrong, or a server did not exit 0.

`--quick` (40 images, concurrency 1 and 4) only proves the script runs end to end. DIR defaults to
benchmarks/results.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import noop_rt
from noop_rt.api import LoadOptions
from noop_rt.demo import BUNDLE_DIR
from noop_rt.demo.digits import write_image_folders
from noop_rt.jobs.accuracy import command_line, model_protocol, protocol_lines, strategy_protocol
from noop_rt.jobs.batch import BatchOptions, run_batch
from noop_rt.jobs.bench import machine_info
from noop_rt.serve import ServeOptions
from noop_rt.serve.launch import ServerProcess
from noop_rt.serve.server import replica_resources

RESULTS = Path(__file__).resolve().parent / "results"
LOAD = {"source": BUNDLE_DIR, "backend": "onnxruntime", "device": "cpu"}  # in process and in every replica
BATCH_SIZE = 16  # in-process batch's images per call (its CLI default)


CPU_GROUPS = (("model replicas", ("ServeReplica:noop-rt:Model",)), ("ingress", ("ServeReplica:noop-rt:Ingress",)),
              ("proxy", ("ProxyActor",)), ("other Ray", ("ray::", "/ray/")))  # (role, command-line markers)


def cpu_seconds() -> dict[str, float] | None:
    """CPU seconds (user + system) used so far by the server's processes, by role, and by this client; None where
    /proc is missing. Read before and after a level: the difference says where the machine's cores went."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {name: 0.0 for name, _ in CPU_GROUPS}
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name, markers in CPU_GROUPS:
            if any(m in cmd for m in markers):
                out[name] += (int(fields[11]) + int(fields[12])) / tick
                break
    mine = os.times()
    out["client"] = mine.user + mine.system
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def in_process(paths: list[str], listing: Path, tmp: Path, single_runs: int, threads: int | None,
               reference: bool = False) -> dict[str, Any]:
    """In-process `batch` images/s and one-image-at-a-time `classify` latency with the engine's `threads` (None: its
    default, as `noop-rt batch` / `classify` run); with `reference`, also the top-1 of every distinct path."""
    load = {**LOAD, "threads": threads}
    with noop_rt.load(**load) as clf:
        distinct = sorted(set(paths))
        labels = {}
        if reference:
            labels = {p: r.label for p, r in zip(distinct, clf.classify(distinct), strict=True)}
        clf.classify(distinct[0])  # warm
        single = []
        for p in (distinct * (1 + single_runs // len(distinct)))[:single_runs]:
            t0 = time.perf_counter()
            clf.classify(p)
            single.append(1e3 * (time.perf_counter() - t0))
    out = tmp / f"batch-{threads}.parquet"
    report = run_batch([str(listing)], out, LoadOptions.of(**load), BatchOptions(batch_size=BATCH_SIZE),
                       log=io.StringIO(), show_progress=False)
    out.unlink(missing_ok=True)
    if report.classified != len(paths):
        raise SystemExit(f"error: in-process batch classified {report.classified} of {len(paths)} images "
                         f"({report.first_error})")
    return {"threads": threads, "reference": labels, "batch_images_per_s": report.images_per_s,
            "batch_seconds": report.seconds, "single_p50_ms": percentile(single, 50),
            "single_p99_ms": percentile(single, 99), "single_runs": len(single)}


async def load_level(url: str, bodies: list[tuple[str, bytes]], concurrency: int) -> dict[str, Any]:
    """Send every body, `concurrency` in flight at a time; per request: latency, status, top-1, server timings."""
    import httpx

    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    records: list[dict[str, Any]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                path, body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            record: dict[str, Any] = {"path": path}
            try:
                r = await client.post(f"{url}/v1/classify", content=body, params={"top_k": 1},
                                      headers={"Content-Type": "image/png"})
                record["status"] = r.status_code
                if r.status_code == 200:
                    answer = r.json()[0]
                    server = answer["server"]
                    record.update(label=answer["top"][0]["class"], batch_size=server["batch_size"],
                                  queue_ms=server["queue_ms"], server_ms=server["total_ms"],
                                  model_ms=server["inference_ms"])
            except httpx.HTTPError as exc:
                record["status"] = f"no answer: {type(exc).__name__}"
            record["ms"] = 1e3 * (time.perf_counter() - t0)
            records.append(record)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client.post(f"{url}/v1/classify", content=bodies[0][1]) for _ in range(concurrency)))
        cpu_before = cpu_seconds()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
        cpu_after = cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else \
        {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    return {"records": records, "seconds": seconds, "cpu_s": cpu}


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The in-process figures a level is compared with: the means of the runs right before and right after it."""
    keys = ("batch_images_per_s", "single_p50_ms", "single_p99_ms")
    return {"threads": before["threads"], **{k: (before[k] + after[k]) / 2 for k in keys},
            "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}


def summarize(level: dict[str, Any], concurrency: int, reference: dict[str, str], base: dict[str, Any],
              same: dict[str, Any]) -> dict[str, Any]:
    """One level's figures against `base` (in-process, engine default threads) and `same` (a replica's threads),
    each bracketing the level."""
    batch_ips = base["batch_images_per_s"]
    records = level["records"]
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["ms"] for r in records]
    ips = len(records) / level["seconds"]
    return {"concurrency": concurrency, "requests": len(records), "seconds": level["seconds"], "images_per_s": ips,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "errors": len(records) - len(ok),
            "wrong": sum(1 for r in ok if r["label"] != reference[r["path"]]),
            "mean_batch_size": statistics.fmean(r["batch_size"] for r in ok) if ok else None,
            "mean_queue_ms": statistics.fmean(r["queue_ms"] for r in ok) if ok else None,
            # where one request's time goes: the model (its whole batch), the server (ingress in to out), the client
            "p50_model_ms": percentile([r["model_ms"] for r in ok], 50) if ok else None,
            "p50_server_ms": percentile([r["server_ms"] for r in ok], 50) if ok else None,
            "in_process": base, "in_process_replica_threads": same, "vs_batch": ips / batch_ips,
            "vs_batch_same_threads": ips / same["batch_images_per_s"],
            "overhead_ms_per_image": 1e3 / ips - 1e3 / same["batch_images_per_s"],
            "p99_vs_single_p50": percentile(latencies, 99) / base["single_p50_ms"],
            # CPU time per request by role (ms): where the cores went during the level
            "cpu_ms_per_request": None if level["cpu_s"] is None else
            {k: 1e3 * v / len(records) for k, v in level["cpu_s"].items()},
            "error_examples": sorted({str(r["status"]) for r in records if r["status"] != 200})[:5]}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        ax.plot(conc, [r[key] for r in rows], marker="o", label=label)
    ax.plot(conc, [r["in_process"]["single_p50_ms"] for r in rows], color="grey", linestyle="--", marker=".",
            label="in process, 1 image (p50)")
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="latency (ms)",
           title="noop-rt serve: latency vs concurrency")
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.minorticks_off()
    ax.legend()
    bx.plot(conc, [r["images_per_s"] for r in rows], marker="o", label="serve")
    bx.plot(conc, [r["in_process"]["batch_images_per_s"] for r in rows], color="grey", linestyle="--", marker=".",
            label=f"in-process batch ({BATCH_SIZE})")
    if rows and rows[0]["in_process_replica_threads"] is not rows[0]["in_process"]:
        bx.plot(conc, [r["in_process_replica_threads"]["batch_images_per_s"] for r in rows], color="grey",
                linestyle=":", marker=".", label=f"in-process batch, {rows[0]['in_process_replica_threads']['threads']}"
                " thread(s)")
    bx.set(xscale="log", xlabel="concurrent requests", ylabel="images/s", title="throughput (in process: around "
           "each level)")
    bx.set_xticks(conc, [str(c) for c in conc])
    bx.minorticks_off()
    bx.set_ylim(bottom=0)
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="noop-rt serve --threads (default: the server's)")
    parser.add_argument("--max-batch-size", type=int, default=ServeOptions().max_batch_size)
    parser.add_argument("--batch-wait-ms", type=float, default=ServeOptions().batch_wait_ms)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images, concurrency 1 and 4")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.images, args.concurrency = 40, "1,4"
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    server_args = ["--bundle", str(BUNDLE_DIR), "--backend", "onnxruntime", "--device", "cpu", "--replicas",
                   str(args.replicas), "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms",
                   str(args.batch_wait_ms), "--top-k", "1", *(["--threads", str(args.threads)] if args.threads else [])]
    tmp = Path(tempfile.mkdtemp())
    try:
        write_image_folders(tmp / "digits")
        pngs = sorted((tmp / "digits" / "test").rglob("*.png"))
        paths = []
        for i in range(args.images):  # distinct paths (copies) so that batch classifies every one
            dst = tmp / "inputs" / f"{i:05d}.png"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(pngs[i % len(pngs)], dst)
            paths.append(str(dst))
        listing = tmp / "paths.txt"
        listing.write_text("\n".join(paths) + "\n")
        with noop_rt.load(**LOAD) as clf:
            protocol = {"data": {"set": "the demo's held-out digits as PNGs (noop-rt demo-data DIR: DIR/test), "
                                        f"{args.images} requests per level cycling over them", "images": args.images},
                        "load": {k: str(v) for k, v in LOAD.items()},
                        "models": {"bundle": model_protocol(clf, args.images)},
                        "runs": {"serve": {"model": "bundle", **strategy_protocol(clf), "server_args": server_args,
                                           "client": "asyncio + httpx, one raw PNG body per POST /v1/classify "
                                                     "?top_k=1, `concurrency` requests in flight, one warm-up "
                                                     "request per connection before timing"},
                                 "batch": {"model": "bundle", **strategy_protocol(clf), "batch_size": BATCH_SIZE}}}
        _, replica_threads = replica_resources(ServeOptions(replicas=args.replicas, threads=args.threads),
                                               float(os.cpu_count() or 1), local=True)
        single_runs = min(100, args.images)

        def measure(first: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
            """In process, no server running: engine default threads, and a replica's threads when they differ."""
            base = in_process(paths, listing, tmp, single_runs, None, reference=first)
            same = base if replica_threads is None else in_process(paths, listing, tmp, single_runs, replica_threads)
            for name, m in (("engine default threads", base), (f"{replica_threads} thread(s) like a replica", same)
                            )[:1 if same is base else 2]:
                print(f"in process, {name}: batch {m['batch_images_per_s']:.1f} images/s, single image p50 "
                      f"{m['single_p50_ms']:.1f} ms", flush=True)
            return base, same

        slots = [measure(first=True)]  # one before each level, one after the last
        reference = slots[0][0]["reference"]
        bodies = [(p, Path(p).read_bytes()) for p in paths]
        rows, exit_codes = [], []
        for c in levels:
            with ServerProcess(server_args) as server:
                level = asyncio.run(load_level(server.url, bodies, c))
                exit_codes.append(server.stop())
            slots.append(measure())
            (b0, s0), (b1, s1) = slots[-2], slots[-1]
            base = bracket(b0, b1)
            same = base if replica_threads is None else bracket(s0, s1)
            rows.append(summarize(level, c, reference, base, same))
            r = rows[-1]
            print(f"  concurrency {c}: {r['images_per_s']:.1f} images/s ({100 * r['vs_batch']:.0f} % of in-process "
                  f"batch {base['batch_images_per_s']:.1f}), p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
                  f"({r['p99_vs_single_p50']:.2f}x in-process single p50 {base['single_p50_ms']:.1f} ms), errors "
                  f"{r['errors']}, wrong {r['wrong']}, mean batch {r['mean_batch_size']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for base, same in slots:
        base.pop("reference", None)
        same.pop("reference", None)
    targets = targets_met(rows)
    out = {"machine": machine_info(), "in_process_runs": [{"default_threads": b, "replica_threads": s_}
                                                          for b, s_ in slots],
           "rows": rows, "targets": targets, "server_exit_codes": exit_codes, "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, args.out / "serve_load.png")
    threads_text = "the engine's default threads" if replica_threads is None else f"{replica_threads} engine thread(s)"
    lines = [f"# `noop-rt serve` under load ({args.images} requests per level, demo bundle, onnxruntime CPU)", "",
             f"Produced by `{command_line('serve_load.py')}` on {out['machine']['cpu']} "
             f"({out['machine']['cpu_count']} cores), client and server on the same machine (loopback), "
             f"{args.replicas} replica(s) with {threads_text}, a fresh server per level. Each level is compared "
             f"with in-process runs on the same images, no server running, right before and right after it (their "
             f"mean): `noop-rt batch` (batch {BATCH_SIZE}, engine default threads) and `classify` one image at a "
             "time. This machine's speed drifts between runs; the bracket keeps each comparison to the same minutes."
             + ("" if replica_threads is None else f" *same threads*: in-process batch with a replica's "
                f"{replica_threads} thread(s)."), "",
             "| in process, around level | batch images/s (before, after) | single image p50 ms (before, after) |",
             "|---|---|---|"]
    for r in rows:
        before, after = r["in_process"]["before"], r["in_process"]["after"]
        lines.append(f"| {r['concurrency']} | {before['batch_images_per_s']:.1f}, {after['batch_images_per_s']:.1f} | "
                     f"{before['single_p50_ms']:.1f}, {after['single_p50_ms']:.1f} |")
    lines += ["",
             "Per request, p50: *model* = the batch it rode in, in the replica; *server* = the ingress, body in to "
             "answer out (decoding, the hop to the replica, the batch wait); the rest of the latency is the client and "
             "HTTP (with Serve's HTTP proxy in between when Serve's throughput-optimized mode is off).", "",
             "| concurrency | images/s | vs batch | vs batch, same threads | overhead (ms/image, same threads) | "
             "p50 ms | p95 ms | p99 ms | p99 / in-process single p50 | p50 server ms | p50 model ms | errors | wrong | "
             "mean batch | mean queue ms |",
             "|---" * 15 + "|"]
    lines += [f"| {r['concurrency']} | {r['images_per_s']:.1f} | {100 * r['vs_batch']:.0f} % | "
              f"{100 * r['vs_batch_same_threads']:.0f} % | {r['overhead_ms_per_image']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_vs_single_p50']:.2f}x | {_fmt(r['p50_server_ms'])} | "
              f"{_fmt(r['p50_model_ms'])} | "
              f"{r['errors']} | {r['wrong']} | {_fmt(r['mean_batch_size'])} | {_fmt(r['mean_queue_ms'])} |"
              for r in rows]
    cpu_rows = [r for r in rows if r.get("cpu_ms_per_request")]
    if cpu_rows:
        roles = [name for name, _ in CPU_GROUPS] + ["client"]
        lines += ["", "Where the cores went: CPU time per request (ms, user + system, read from /proc before and after "
                  "each level). *in-process batch* = the most CPU per image the in-process batch around the level "
                  "can have spent (all cores for its whole run).", "",
                  "| concurrency | " + " | ".join(roles) + " | total | cores busy | in-process batch |",
                  "|---" * (len(roles) + 4) + "|"]
        for r in cpu_rows:
            c = r["cpu_ms_per_request"]
            total = sum(c.values())
            lines.append(f"| {r['concurrency']} | " + " | ".join(f"{c.get(k, 0.0):.1f}" for k in roles)
                         + f" | {total:.1f} | {total * r['images_per_s'] / 1e3:.2f} | "
                         f"{1e3 * out['machine']['cpu_count'] / r['in_process']['batch_images_per_s']:.1f} |")
    lines += ["", "Targets (issue 19), measured in this run:", ""]
    lines += [f"- {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}" for t in targets]
    lines += ["", "![latency and throughput vs concurrency](serve_load.png)"]
    lines += protocol_lines(protocol)
    (args.out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 12]))
    if any(r["errors"] or r["wrong"] for r in rows) or any(exit_codes):
        sys.exit(1)


def targets_met(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [{"target": "no request lost or wrong", "value": f"{sum(r['errors'] for r in rows)} errors, "
            f"{sum(r['wrong'] for r in rows)} wrong", "met": not any(r["errors"] or r["wrong"] for r in rows)}]
    by = {r["concurrency"]: r for r in rows}
    if 16 in by:
        r = by[16]
        out.append({"target": "concurrency 16: >= 80 % of in-process batch images/s",
                    "value": f"{100 * r['vs_batch']:.0f} % ({r['images_per_s']:.1f} of "
                             f"{r['in_process']['batch_images_per_s']:.1f})", "met": r["vs_batch"] >= 0.8})
    if 1 in by:
        r = by[1]
        out.append({"target": "concurrency 1: p99 <= 2x in-process single-image latency (p50)",
                    "value": f"{r['p99_ms']:.1f} ms = {r['p99_vs_single_p50']:.2f}x "
                             f"{r['in_process']['single_p50_ms']:.1f} ms", "met": r["p99_vs_single_p50"] <= 2.0})
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
