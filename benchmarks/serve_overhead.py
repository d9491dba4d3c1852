"""Ray Serve's own cost per request on this machine, with no model: the floor under `noop-rt serve`'s overhead.

Two do-nothing applications on a local cluster, each answering POST /v1/classify (a PNG body, read and dropped) with
a constant JSON list, as `noop-rt serve` is laid out and as it could be:

- `two deployments`: a FastAPI ingress that calls a second deployment through a handle (noop-rt serve's layout: the
  ingress in front of the model replicas);
- `one deployment`: the FastAPI ingress answers itself (the model held inside the ingress replicas).

For each, an asyncio + httpx client on the same machine sends the demo's 360 held-out PNGs at concurrency 1 and 16:
requests/s and CPU time per request by process (read from /proc before and after, as serve_load.py does). Both
layouts run twice, each time on a fresh local cluster: behind Serve's HTTP proxy (RAY_SERVE_THROUGHPUT_OPTIMIZED=0),
and in Ray Serve's throughput-optimized mode with direct ingress, as `noop-rt serve` runs on its own local cluster.

    python benchmarks/serve_overhead.py [--out benchmarks/results]   # writes serve_overhead.{md,json}
"""


import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi import FastAPI, Request  # no `from __future__ import annotations`: the replicas resolve these types
from serve_load import cpu_seconds

from noop_rt.demo.digits import write_image_folders
from noop_rt.jobs.accuracy import command_line
from noop_rt.jobs.bench import machine_info
from noop_rt.serve.server import free_port, throughput_optimized

RESULTS = Path(__file__).resolve().parent / "results"
APP = "noop-rt"  # the application name noop-rt serve uses, so that serve_load's process roles apply
LEVELS = (1, 16)


def build(layout: str) -> Any:
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Model")
    class Model:
        async def __call__(self, size: int) -> dict[str, Any]:
            return {"label": "seven", "bytes": size}

    @serve.deployment(name="Ingress")
    @serve.ingress(api)
    class Ingress:
        def __init__(self, model: Any = None) -> None:  # a handle of this replica's settings, as noop-rt's Ingress
            self.model = None if model is None else serve.get_deployment_handle(model.deployment_name, model.app_name)

        @api.post("/v1/classify")
        async def classify(self, request: Request) -> list[dict[str, Any]]:
            body = await request.body()
            if self.model is not None:
                return [await self.model.remote(len(body))]
            return [{"label": "seven", "bytes": len(body)}]

    return Ingress.bind(Model.bind()) if layout == "two deployments" else Ingress.bind()


async def level(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(body: bytes) -> None:
            async with gate:
                r = await client.post(url, content=body, headers={"Content-Type": "image/png"})
                r.raise_for_status()

        await asyncio.gather(*(one(b) for b in bodies[:50]))  # warm-up
        before, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        seconds, after = time.perf_counter() - t0, cpu_seconds()
    cpu = None if before is None or after is None else \
        {k: round(1e3 * (after[k] - before[k]) / len(bodies), 2) for k in after}
    return {"concurrency": concurrency, "requests": len(bodies), "requests_per_s": len(bodies) / seconds,
            "cpu_ms_per_request": cpu, "cpu_ms_per_request_total": None if cpu is None else round(sum(cpu.values()), 2)}


MODES = ("Serve's HTTP proxy", "throughput-optimized")


def run_mode(mode: str, bodies: list[bytes]) -> list[dict[str, Any]]:
    """Both layouts on a fresh local cluster started in `mode`: Serve's HTTP proxy in front of the ingress
    (RAY_SERVE_THROUGHPUT_OPTIMIZED=0), or Ray Serve's throughput-optimized mode with its direct ingress, set up
    exactly as `noop-rt serve` sets it up (`throughput_optimized`)."""
    import ray
    from ray import serve

    saved = dict(os.environ)
    port = free_port("127.0.0.1")
    if mode == MODES[0]:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"
        proxy_port = port
    else:
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
        if not throughput_optimized(port):
            raise SystemExit("error: direct ingress is off in this environment (RAY_SERVE_ENABLE_DIRECT_INGRESS=0?)")
        proxy_port = free_port("127.0.0.1")
    rows = []
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        for layout in ("two deployments", "one deployment"):
            serve.run(build(layout), name=APP, route_prefix="/")
            for c in LEVELS:
                row = {"mode": mode, "layout": layout,
                       **asyncio.run(level(f"http://127.0.0.1:{port}/v1/classify", bodies, c))}
                rows.append(row)
                print(f"{mode}, {layout}, concurrency {c}: {row['requests_per_s']:.0f} requests/s, CPU ms/request "
                      f"{row['cpu_ms_per_request']}", flush=True)
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folders(Path(tmp) / "digits")
        bodies = [p.read_bytes() for p in sorted((Path(tmp) / "digits" / "test").rglob("*.png"))]
    rows = [row for mode in MODES for row in run_mode(mode, bodies)]
    out = {"machine": machine_info(), "rows": rows, "command": command_line("serve_overhead.py")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    roles = list(rows[0]["cpu_ms_per_request"] or {})
    lines = ["# Ray Serve's own cost per request, no model (the floor under `noop-rt serve`)", "",
             f"Produced by `{out['command']}` on {out['machine']['cpu']} ({out['machine']['cpu_count']} cores), one "
             "run, client and server on the same machine (loopback). Both applications read the PNG body and answer "
             "a constant JSON list; *two deployments* calls a second deployment through a handle, as `noop-rt "
             "serve`'s ingress calls its model replicas; *one deployment* answers in the ingress. CPU time per "
             "request by process role (ms, user + system from /proc; *model replicas* is the second deployment).", "",
             "Modes, each on a fresh local cluster: *Serve's HTTP proxy*: `RAY_SERVE_THROUGHPUT_OPTIMIZED=0`, HTTP "
             "enters through Serve's proxy actor, deployments call each other as Ray actor tasks; "
             "*throughput-optimized*: Ray Serve's `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` with its direct ingress (the "
             "ingress replica listens itself, no proxy hop; gRPC between deployments), set up as `noop-rt serve` "
             "does on its own local cluster (`noop_rt.serve.server.throughput_optimized`).", "",
             "| mode | layout | concurrency | requests/s | " + " | ".join(roles) + " | total CPU ms/request |",
             "|---" * (len(roles) + 5) + "|"]
    for r in rows:
        c = r["cpu_ms_per_request"] or {}
        lines.append(f"| {r['mode']} | {r['layout']} | {r['concurrency']} | {r['requests_per_s']:.0f} | "
                     + " | ".join(f"{c.get(k, 0.0):.1f}" for k in roles) + f" | {r['cpu_ms_per_request_total']} |")
    (args.out / "serve_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
