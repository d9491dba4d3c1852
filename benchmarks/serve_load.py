"""Load test of `noop-rt serve` on loopback, against in-process `batch` on the same images.

    python benchmarks/serve_load.py [--images 400] [--concurrency 1,4,16,64] [--replicas 1] [--quick] [--out DIR]
    # writes DIR/serve_load.{md,json,png}

1. In process (no server running): `noop-rt batch` (run_batch, batch 16) over the N images gives the images/s to
   beat, and `classify` one image at a time gives the single-image latency; `classify` of every distinct image gives
   the reference top-1. Both with the engine's default threads (as `noop-rt batch` runs) and again with the threads
   a server replica gets (`replica_resources`), so that the serving overhead can be told from the thread setting.
2. `noop-rt serve` in a child process (a local Ray cluster, --port 0), then for each concurrency level an asyncio +
   httpx client keeps that many requests in flight (each a raw PNG body to POST /v1/classify) until all N are
   answered: throughput, p50/p95/p99 latency (client wall time), errors (non-200 or no answer: must be 0), answers
   whose top-1 differs from the in-process one (must be 0), and the mean batch size and queue time the server reports.
3. Overhead per image = 1000 / serve images/s - 1000 / batch images/s with the same engine threads (ms).
   Targets (issue 19): no request lost or
   wrong; at concurrency 16, >= 80 % of in-process batch images/s; p99 at concurrency 1 <= 2x the in-process
   single-image latency (median). The exit code is 1 when a request was lost or wrong.

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
from noop_rt.batch import BatchOptions, run_batch
from noop_rt.bench import machine_info
from noop_rt.demo import BUNDLE_DIR
from noop_rt.demo.digits import write_image_folders
from noop_rt.evaluation import command_line, model_protocol, protocol_lines, strategy_protocol
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


def in_process(paths: list[str], listing: Path, tmp: Path, single_runs: int, threads: int | None) -> dict[str, Any]:
    """In-process `batch` images/s and one-image-at-a-time `classify` latency with the engine's `threads` (None: its
    default, as `noop-rt batch` / `classify` run), and the reference top-1 of every path."""
    load = {**LOAD, "threads": threads}
    with noop_rt.load(**load) as clf:
        distinct = sorted(set(paths))
        results = clf.classify(distinct)
        reference = {p: r.label for p, r in zip(distinct, results, strict=True)}
        clf.classify(distinct[0])  # warm
        single = []
        for p in (distinct * (1 + single_runs // len(distinct)))[:single_runs]:
            t0 = time.perf_counter()
            clf.classify(p)
            single.append(1e3 * (time.perf_counter() - t0))
    out = tmp / f"batch-{threads}.parquet"
    report = run_batch([str(listing)], out, load, BatchOptions(batch_size=BATCH_SIZE), log=io.StringIO(),
                       show_progress=False)
    out.unlink(missing_ok=True)
    if report.classified != len(paths):
        raise SystemExit(f"error: in-process batch classified {report.classified} of {len(paths)} images "
                         f"({report.first_error})")
    return {"threads": threads, "reference": reference, "batch_images_per_s": report.images_per_s,
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


def summarize(level: dict[str, Any], concurrency: int, reference: dict[str, str], batch_ips: float) -> dict[str, Any]:
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
            "vs_batch": ips / batch_ips,
            # CPU time per request by role (ms): where the cores went during the level
            "cpu_ms_per_request": None if level["cpu_s"] is None else
            {k: 1e3 * v / len(records) for k, v in level["cpu_s"].items()},
            "error_examples": sorted({str(r["status"]) for r in records if r["status"] != 200})[:5]}


def plot(rows: list[dict[str, Any]], base: dict[str, Any], same: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        ax.plot(conc, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(base["single_p50_ms"], color="grey", linestyle="--", label="in process, 1 image (p50)")
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="latency (ms)",
           title="noop-rt serve: latency vs concurrency")
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.minorticks_off()
    ax.legend()
    bx.plot(conc, [r["images_per_s"] for r in rows], marker="o", label="serve")
    bx.axhline(base["batch_images_per_s"], color="grey", linestyle="--", label=f"in-process batch ({BATCH_SIZE})")
    if same is not base:
        bx.axhline(same["batch_images_per_s"], color="grey", linestyle=":",
                   label=f"in-process batch, {same['threads']} thread(s)")
    bx.set(xscale="log", xlabel="concurrent requests", ylabel="images/s", title="throughput")
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
        base = in_process(paths, listing, tmp, min(100, args.images), None)
        same = base if replica_threads is None else in_process(paths, listing, tmp, min(100, args.images),
                                                               replica_threads)
        for name, m in (("in process, engine default threads", base),
                        (f"in process, {replica_threads} thread(s) like a replica", same))[:1 if same is base else 2]:
            print(f"{name}: batch {m['batch_images_per_s']:.1f} images/s, single image p50 "
                  f"{m['single_p50_ms']:.1f} ms", flush=True)
        bodies = [(p, Path(p).read_bytes()) for p in paths]
        rows = []
        with ServerProcess(server_args) as server:
            print(f"server at {server.url}", flush=True)
            for c in levels:
                level = asyncio.run(load_level(server.url, bodies, c))
                rows.append(summarize(level, c, base["reference"], base["batch_images_per_s"]))
                r = rows[-1]
                print(f"  concurrency {c}: {r['images_per_s']:.1f} images/s, p50 {r['p50_ms']:.1f} ms, p99 "
                      f"{r['p99_ms']:.1f} ms, errors {r['errors']}, wrong {r['wrong']}, mean batch "
                      f"{r['mean_batch_size']}", flush=True)
            exit_code = server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base.pop("reference")
    same.pop("reference", None)
    for r in rows:  # the serving overhead: against in-process batch with the same engine threads
        r["vs_batch_same_threads"] = r["images_per_s"] / same["batch_images_per_s"]
        r["overhead_ms_per_image"] = 1e3 / r["images_per_s"] - 1e3 / same["batch_images_per_s"]
    targets = targets_met(rows, base)
    out = {"machine": machine_info(), "in_process": base, "in_process_replica_threads": same, "rows": rows,
           "targets": targets,
           "server_exit_code": exit_code, "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, base, same, args.out / "serve_load.png")
    threads_text = "the engine's default threads" if replica_threads is None else f"{replica_threads} engine thread(s)"
    lines = [f"# `noop-rt serve` under load ({args.images} requests per level, demo bundle, onnxruntime CPU)", "",
             f"Produced by `{command_line('serve_load.py')}` on {out['machine']['cpu']} "
             f"({out['machine']['cpu_count']} cores), client and server on the same machine (loopback), "
             f"{args.replicas} replica(s) with {threads_text}. In process (`noop-rt batch`, "
             f"batch {BATCH_SIZE}, engine default threads): {base['batch_images_per_s']:.1f} images/s; one image at a "
             f"time p50 {base['single_p50_ms']:.1f} ms, p99 {base['single_p99_ms']:.1f} ms."
             + ("" if same is base else f" With a replica's {replica_threads} thread(s): "
                f"{same['batch_images_per_s']:.1f} images/s; one image p50 {same['single_p50_ms']:.1f} ms."), "",
             "Per request, p50: *model* = the batch it rode in, in the replica; *server* = the ingress, body in to "
             "answer out (decoding, the hop to the replica, the batch wait); the rest of the latency is the client, "
             "HTTP and Ray Serve's proxy.", "",
             "| concurrency | images/s | vs batch | vs batch, same threads | overhead (ms/image, same threads) | "
             "p50 ms | p95 ms | p99 ms | p50 server ms | p50 model ms | errors | wrong | mean batch | mean queue ms |",
             "|---" * 14 + "|"]
    lines += [f"| {r['concurrency']} | {r['images_per_s']:.1f} | {100 * r['vs_batch']:.0f} % | "
              f"{100 * r['vs_batch_same_threads']:.0f} % | {r['overhead_ms_per_image']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {_fmt(r['p50_server_ms'])} | {_fmt(r['p50_model_ms'])} | "
              f"{r['errors']} | {r['wrong']} | {_fmt(r['mean_batch_size'])} | {_fmt(r['mean_queue_ms'])} |"
              for r in rows]
    cpu_rows = [r for r in rows if r.get("cpu_ms_per_request")]
    if cpu_rows:
        roles = [name for name, _ in CPU_GROUPS] + ["client"]
        lines += ["", "Where the cores went: CPU time per request (ms, user + system, read from /proc before and after "
                  "each level). The in-process batch spends "
                  f"{1e3 * out['machine']['cpu_count'] / base['batch_images_per_s']:.1f} ms of CPU per image at most "
                  "(all cores for its whole run).", "",
                  "| concurrency | " + " | ".join(roles) + " | total | cores busy |", "|---" * (len(roles) + 3) + "|"]
        for r in cpu_rows:
            c = r["cpu_ms_per_request"]
            total = sum(c.values())
            lines.append(f"| {r['concurrency']} | " + " | ".join(f"{c.get(k, 0.0):.1f}" for k in roles)
                         + f" | {total:.1f} | {total * r['images_per_s'] / 1e3:.2f} |")
    lines += ["", "Targets (issue 19), measured in this run:", ""]
    lines += [f"- {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}" for t in targets]
    lines += ["", "![latency and throughput vs concurrency](serve_load.png)"]
    lines += protocol_lines(protocol)
    (args.out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 12]))
    if any(r["errors"] or r["wrong"] for r in rows):
        sys.exit(1)


def targets_met(rows: list[dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    out = [{"target": "no request lost or wrong", "value": f"{sum(r['errors'] for r in rows)} errors, "
            f"{sum(r['wrong'] for r in rows)} wrong", "met": not any(r["errors"] or r["wrong"] for r in rows)}]
    by = {r["concurrency"]: r for r in rows}
    if 16 in by:
        out.append({"target": "concurrency 16: >= 80 % of in-process batch images/s",
                    "value": f"{100 * by[16]['vs_batch']:.0f} %", "met": by[16]["vs_batch"] >= 0.8})
    if 1 in by:
        ratio = by[1]["p99_ms"] / base["single_p50_ms"]
        out.append({"target": "concurrency 1: p99 <= 2x in-process single-image latency (p50)",
                    "value": f"{by[1]['p99_ms']:.1f} ms = {ratio:.2f}x {base['single_p50_ms']:.1f} ms",
                    "met": ratio <= 2.0})
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
