"""`noop-rt serve` under hostile traffic (issue 27's table and the README's bad requests), on loopback, demo bundle.

    python benchmarks/serve_abuse.py [--idle-requests 200] [--idle-connections 900] [--out DIR]
    # writes DIR/serve_abuse.{md,json}

1. A server in a child process (`--api-key`, every other setting at its default), and a well-behaved client: 4
   threads that classify the demo examples (raw PNG bodies, with the key) one request after another. Idle run: the
   client alone for N requests: p50/p99, errors (non-200), wrong answers (top-1 not the file's name).
2. Abuse run: the same client runs throughout, while the hostile requests below are sent one after another (the
   idle and slow connections, and a slow body, in the background from the start); each one's status and time.
   The server's processes (its session: the local Ray cluster) are sampled for RSS every 0.25 s.
3. After: RSS for 30 s (when it is back under idle + 100 MB), the count of 500s in Ray Serve's
   `ray_serve_num_http_requests_total`, the listening sockets on a non-loopback address, and SIGTERM's exit code.

Targets (issue 27): the client 0 errors and 0 wrong with p99 <= 3x its idle p99; peak RSS <= idle + 500 MB and
back to idle + 100 MB within 30 s; every hostile request a 4xx (or 504), never 500, and 0 false 500s in the
metrics; nothing listening beyond loopback. The exit code is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import re
import socket
import statistics
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from noop_rt.demo import EXAMPLES_DIR
from noop_rt.jobs.accuracy import command_line
from noop_rt.jobs.bench import machine_info
from noop_rt.serve.launch import ServerProcess, public_sockets

KEY = "abuse-benchmark-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))


def png(size: tuple[int, int], mode: str = "RGBA", rows: int | None = None) -> bytes:
    """A PNG of zeros, written row by row (never held as an image here): RGBA 8-bit or 1-bit; `rows` cuts its data
    short (a bomb of a few KB with the full header)."""
    width, height = size
    color_type, bit_depth, row_bytes = {"RGBA": (6, 8, 4 * width), "1": (0, 1, (width + 7) // 8)}[mode]
    row = b"\x00" * (1 + row_bytes)
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(height if rows is None else rows)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def jpeg(size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size[1] // 50 + 2, size[0] // 50 + 2, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class GoodClient:
    """4 threads classifying the demo examples until stopped; latencies, errors and wrong answers."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.threads = url, threads
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.wrong = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self, requests: int | None = None) -> None:
        counter = iter(range(10**9 if requests is None else requests))

        def worker(seed: int) -> None:
            with httpx.Client(timeout=120, headers=AUTH) as client:
                for i in counter:
                    if self.stop.is_set():
                        return
                    path = EXAMPLES[(i + seed) % len(EXAMPLES)]
                    t0 = time.perf_counter()
                    try:
                        r = client.post(self.url + "/v1/classify", content=path.read_bytes(),
                                        headers={"Content-Type": "image/png"})
                        ok, answer = r.status_code == 200, (r.json() if r.status_code == 200 else r.text[:120])
                    except httpx.HTTPError as exc:
                        ok, answer = False, f"{type(exc).__name__}: {exc}"
                    with self.lock:
                        if not ok:
                            self.errors.append(str(answer))
                            continue
                        self.latencies.append(1e3 * (time.perf_counter() - t0))
                        self.wrong += answer[0]["top"][0]["class"] != path.stem

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(self.threads)]
        for t in threads:
            t.start()
        self.workers = threads
        if requests is not None:
            for t in threads:
                t.join()

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for t in getattr(self, "workers", []):
            t.join()
        return {"requests": len(self.latencies) + len(self.errors), "errors": len(self.errors),
                "error_examples": self.errors[:5], "wrong": self.wrong,
                "p50_ms": round(percentile(self.latencies, 50), 1), "p99_ms": round(percentile(self.latencies, 99), 1)}


class RssSampler:
    """The RSS of every process of the server's session, summed, every 0.25 s."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in self.server.processes():
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.samples.append((time.monotonic(), total / 2**20))
            time.sleep(0.25)

    def between(self, start: float, end: float) -> list[float]:
        return [mb for t, mb in self.samples if start <= t <= end]


# ---------------------------------------------------------------------------------------------- raw connections
def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def read_until_closed(s: socket.socket, limit_s: float) -> bytes:
    s.settimeout(limit_s)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def status_of(answer: bytes) -> int | None:
    try:
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    except (IndexError, ValueError):
        return None


def huge_header(url: str, mb: int) -> int | None:
    with socket.create_connection(host_port(url), timeout=30) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        try:
            for _ in range(mb):
                s.sendall(chunk)
        except OSError:
            pass
        return status_of(read_until_closed(s, 30))


def idle_connections(url: str, count: int, hold_s: float, report: dict[str, Any]) -> None:
    """`count` connections that send nothing (half of them) or trickle a header (the other half)."""
    socks = []
    for i in range(count):
        try:
            s = socket.create_connection(host_port(url), timeout=10)
            s.setblocking(False)
            socks.append((s, i % 2 == 1))
        except OSError:
            report["refused"] = report.get("refused", 0) + 1
    t0 = time.monotonic()
    closed_at: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    for s, trickle in socks:
        if trickle:
            with contextlib.suppress(OSError):
                s.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    while time.monotonic() - t0 < hold_s and len(closed_at) < len(socks):
        for i, (s, trickle) in enumerate(socks):
            if i in closed_at:
                continue
            try:
                data = s.recv(65536)
                if data:
                    answers[i] = answers.get(i, b"") + data
                else:
                    closed_at[i] = time.monotonic() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - t0
                continue
            if trickle:
                try:
                    s.send(b"X")
                except OSError:
                    closed_at[i] = time.monotonic() - t0
        time.sleep(0.5)
    statuses: dict[str, int] = {}
    for i in range(len(socks)):
        key = str(status_of(answers.get(i, b"")) or "closed, no answer")
        if i in closed_at:
            statuses[key] = statuses.get(key, 0) + 1
    report.update(opened=len(socks), closed_by_server=len(closed_at),
                  last_closed_s=round(max(closed_at.values()), 1) if closed_at else None, statuses=statuses,
                  still_open_after_s=hold_s if len(closed_at) < len(socks) else None)
    for s, _ in socks:
        s.close()


def slow_body(url: str, report: dict[str, Any]) -> None:
    t0 = time.monotonic()
    with socket.create_connection(host_port(url), timeout=10) as s:
        s.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n".encode() + b"\x89PNG" + b"a" * 1000)
        answer = read_until_closed(s, 90)
    report.update(status=status_of(answer), seconds=round(time.monotonic() - t0, 1))


def disconnect_mid_body(url: str, times: int) -> None:
    for _ in range(times):
        with socket.create_connection(host_port(url), timeout=10) as s:
            s.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                      "Content-Type: image/png\r\nContent-Length: 1000000\r\n\r\n".encode() + b"a" * 20000)
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- requests
def fp32_infer(batch: int) -> tuple[bytes, dict[str, str]]:
    data = np.zeros((batch, 3, 16, 16), dtype=np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": [batch, 3, 16, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream", **AUTH}


def hostile_requests(url: str) -> list[tuple[str, Callable[[], Any]]]:
    big_png = png((7000, 7000))
    seven = (EXAMPLES_DIR / "seven.png").read_bytes()
    classify = url + "/v1/classify"
    infer = url + "/v2/models/digits/infer"

    def post(target: str, **kw: Any) -> Callable[[], int]:
        def go() -> int:
            headers = {**AUTH, **kw.pop("headers", {})} if "headers" in kw else dict(AUTH)
            return httpx.post(target, timeout=120, headers=headers, **kw).status_code
        return go

    def files(data: bytes, n: int, kind: str = "image/png") -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("files", (f"{i}.png", data, kind)) for i in range(n)]

    nested = b"[" * 100_000 + b"]" * 100_000
    zeros = gzip.compress(b"\0" * (200 << 20), compresslevel=9)
    fp32_1000, fp32_1000_headers = fp32_infer(1000)
    fp32_256, fp32_256_headers = fp32_infer(256)
    bomb = png((40000, 40000), "1", rows=16)
    return [
        ("one 7000x7000 RGBA PNG (186 KB)", post(classify, content=big_png, headers={"Content-Type": "image/png"})),
        ("multipart of 20 such PNGs", post(classify, files=files(big_png, 20))),
        ("one 3900x3900 RGBA PNG (under the pixel cap)",
         post(classify, content=png((3900, 3900)), headers={"Content-Type": "image/png"})),
        ("one 4000x3500 JPEG (under the pixel cap)",
         post(classify, content=jpeg((4000, 3500)), headers={"Content-Type": "image/jpeg"})),
        ("multipart of 256 small images", post(classify, files=files(seven, 256))),
        ("v2 infer, FP32 binary, B = 1000", post(infer, content=fp32_1000, headers=fp32_1000_headers)),
        ("v2 infer, FP32 binary, B = 256", post(infer, content=fp32_256, headers=fp32_256_headers)),
        ("v2 JSON nested 100,000 deep", post(infer, content=nested, headers={"Content-Type": "application/json"})),
        ("4 x 100 MB headers at once", lambda: run_parallel([lambda: huge_header(url, 100)] * 4)),
        ("Authorization: Bearer wrong", lambda: httpx.post(classify, content=seven, timeout=60, headers={
            "Authorization": "Bearer wrong-key-0123456789"}).status_code),
        ("no Authorization header", lambda: httpx.post(classify, content=seven, timeout=60).status_code),
        ("Host: rebound.attacker.example (DNS rebinding)", post(classify, content=seven, headers={
            "Host": "rebound.attacker.example"})),
        ("cross-origin form POST", post(classify, content=seven, headers={
            "Origin": "https://attacker.example", "Content-Type": "application/x-www-form-urlencoded"})),
        ("200 header fields", post(classify, content=seven, headers={f"x-h{i}": "1" for i in range(200)})),
        ("a text file as an image", post(classify, content=b"hello, not an image",
                                         headers={"Content-Type": "image/png"})),
        ("an empty body", post(classify, content=b"")),
        ("11 MB body (over --max-upload-mb 10)", post(classify, content=b"\0" * (11 << 20))),
        ("40000x40000 PNG bomb", post(classify, content=bomb, headers={"Content-Type": "image/png"})),
        ("gzip bomb: 200 MB of zeros as Content-Encoding: gzip", post(classify, content=zeros, headers={
            "Content-Encoding": "gzip", "Content-Type": "image/png"})),
        ("malformed multipart", post(classify, content=b"--x\r\nbroken",
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})),
        ("wrong path", lambda: httpx.get(url + "/v1/nothing", headers=AUTH, timeout=30).status_code),
        ("wrong method", lambda: httpx.get(classify, headers=AUTH, timeout=30).status_code),
        ("20 clients disconnecting mid-body", lambda: disconnect_mid_body(url, 20) or "sent"),
    ]


def run_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    out: list[Any] = [None] * len(calls)

    def one(i: int) -> None:
        out[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def http_500s(url: str) -> dict[str, float]:
    """ray_serve_num_http_requests_total by status code (from the server's /metrics)."""
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=60).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_serve_num_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            found = re.search(r'status_code="([^"]*)"', labels)
            code = found.group(1) if found else "?"
            counts[code] = counts.get(code, 0.0) + float(value)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-requests", type=int, default=200)
    parser.add_argument("--idle-connections", type=int, default=900)
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    report: dict[str, Any] = {"command": command_line("serve_abuse.py"), "machine": machine_info()}
    with ServerProcess(["--api-key", KEY]) as server:
        url = server.url
        rss = RssSampler(server)
        GoodClient(url).run(20)  # warm-up
        t_idle = time.monotonic()
        idle = GoodClient(url)
        idle.run(args.idle_requests)
        report["idle"] = idle.finish()
        idle_rss = statistics.mean(rss.between(t_idle, time.monotonic()))

        t_abuse = time.monotonic()
        good = GoodClient(url)
        good.run()
        background: dict[str, dict[str, Any]] = {"idle and slow connections": {}, "slow body": {}}
        side = [threading.Thread(target=idle_connections, args=(url, args.idle_connections, args.hold_s,
                                                                background["idle and slow connections"])),
                threading.Thread(target=slow_body, args=(url, background["slow body"]))]
        for t in side:
            t.start()
        rows = []
        for name, call in hostile_requests(url):
            t0 = time.perf_counter()
            try:
                status = call()
            except Exception as exc:  # a hostile request's own failure is a result too
                status = f"{type(exc).__name__}: {str(exc)[:80]}"
            rows.append({"request": name, "status": status, "seconds": round(time.perf_counter() - t0, 2)})
            print(f"{name}: {status} in {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
        for t in side:
            t.join()
        report["abuse"] = good.finish()
        t_end = time.monotonic()
        report["hostile"] = rows
        report["background"] = background
        time.sleep(30)
        after = [(t - t_end, mb) for t, mb in rss.samples if t >= t_end]
        back = next((round(t, 1) for t, mb in after if mb <= idle_rss + 100), None)
        rss.stop.set()
        report["rss_mb"] = {"idle": round(idle_rss), "peak_during_abuse": round(max(rss.between(t_abuse, t_end))),
                            "after_30_s": round(after[-1][1]) if after else None,
                            "back_under_idle_plus_100_after_s": back}
        time.sleep(5)  # Ray's exporter publishes every few seconds
        report["http_requests_by_status"] = http_500s(url)
        report["public_sockets"] = public_sockets(server.listening())
        report["sigterm_exit_code"] = server.stop()
    report["targets"] = targets(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_abuse.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "serve_abuse.md").write_text(markdown(report))
    print(markdown(report))
    sys.exit(0 if all(t["met"] for t in report["targets"]) else 1)


def hostile_ok(status: Any) -> bool:
    statuses = status if isinstance(status, list) else [status]
    return all(s == "sent" or (isinstance(s, int) and (400 <= s < 500 or s == 504 or s == 200)) for s in statuses)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    idle, abuse, rss = r["idle"], r["abuse"], r["rss_mb"]
    codes = r["http_requests_by_status"]
    return [
        {"target": "well-behaved client: 0 errors, 0 wrong", "met": abuse["errors"] == 0 and abuse["wrong"] == 0,
         "value": f"{abuse['errors']} errors, {abuse['wrong']} wrong of {abuse['requests']}"},
        {"target": "its p99 <= 3x idle p99", "met": abuse["p99_ms"] <= 3 * idle["p99_ms"],
         "value": f"{abuse['p99_ms']} ms vs {idle['p99_ms']} ms idle ({abuse['p99_ms'] / idle['p99_ms']:.2f}x)"},
        {"target": "peak RSS <= idle + 500 MB", "met": rss["peak_during_abuse"] <= rss["idle"] + 500,
         "value": f"{rss['peak_during_abuse']} MB vs {rss['idle']} MB idle"},
        {"target": "back to idle + 100 MB within 30 s", "met": rss["back_under_idle_plus_100_after_s"] is not None,
         "value": f"after {rss['back_under_idle_plus_100_after_s']} s"},
        {"target": "every hostile request 4xx/504 (200 where it is within the limits), never 500",
         "met": all(hostile_ok(h["status"]) for h in r["hostile"]) and r["background"]["slow body"].get("status")
         in (408, None), "value": ", ".join(str(h["status"]) for h in r["hostile"])},
        {"target": "0 false 500s in ray_serve_num_http_requests_total", "met": codes.get("500", 0) == 0,
         "value": json.dumps(codes)},
        {"target": "nothing listens beyond loopback", "met": not r["public_sockets"],
         "value": str(r["public_sockets"])},
        {"target": "SIGTERM exits 0", "met": r["sigterm_exit_code"] == 0, "value": str(r["sigterm_exit_code"])},
    ]


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["# serve_abuse: `noop-rt serve` under hostile traffic", "",
             f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores), {m.get('platform')}, Python {m.get('python')}, "
             f"onnxruntime {m.get('onnxruntime')}. Command: `{r['command']}`. One run: the demo bundle on loopback, "
             "`--api-key`, every other setting at its default; a well-behaved client (4 threads, raw PNG bodies of "
             "the demo examples) alone, then while the hostile requests below run one after another (the idle/slow "
             "connections and a slow body in the background from the start). Protocol: benchmarks/serve_abuse.py.",
             "", "| target | met | value |", "|---|---|---|"]
    lines += [f"| {t['target']} | {'yes' if t['met'] else 'NO'} | {t['value']} |" for t in r["targets"]]
    i, a = r["idle"], r["abuse"]
    lines += ["", "| well-behaved client | requests | errors | wrong | p50 ms | p99 ms |", "|---|---|---|---|---|---|",
              f"| alone | {i['requests']} | {i['errors']} | {i['wrong']} | {i['p50_ms']} | {i['p99_ms']} |",
              f"| during the abuse | {a['requests']} | {a['errors']} | {a['wrong']} | {a['p50_ms']} | {a['p99_ms']} |",
              "", "| hostile request | status | seconds |", "|---|---|---|"]
    lines += [f"| {h['request']} | {h['status']} | {h['seconds']} |" for h in r["hostile"]]
    b = r["background"]
    lines += ["", f"Background: idle and slow connections: {json.dumps(b['idle and slow connections'])}; slow body "
                  f"(headers and 1 KB of a 100 KB body, then silence): {json.dumps(b['slow body'])}.",
              "", f"Server RSS (all its processes, MB): {json.dumps(r['rss_mb'])}. "
                  f"ray_serve_num_http_requests_total by status: {json.dumps(r['http_requests_by_status'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
