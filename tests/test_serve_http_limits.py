"""The connection limits of `noop-rt serve` (serve.http_limits) on a plain uvicorn server in this process: slow
headers and bodies cut off, an oversized header block refused before it is read in full, too many connections
refused, and well-behaved requests (slow ones included) untouched."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="uvicorn comes with the serve extra (pip install -e '.[serve]')")

from noop_rt.serve.http_limits import LIMITS_ENV, HttpLimits, LimitedHTTPProtocol  # noqa: E402

LIMITS = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_header_bytes=8 * 1024, max_connections=4)
events: list[str] = []


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            events.append("disconnect")
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)  # longer than the header and body timeouts: the app's own time is not limited
    payload = json.dumps({"bytes": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    mp = pytest.MonkeyPatch()
    mp.setenv(LIMITS_ENV, json.dumps(asdict(LIMITS)))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=LimitedHTTPProtocol, log_level="critical",
                            lifespan="off", timeout_keep_alive=5)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(10)
    mp.undo()


def _connect(server: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(server, timeout=5)
    s.settimeout(5)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (raises on a 5 s silence)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_a_well_behaved_request_and_a_slow_answer_on_a_kept_alive_connection_pass(server) -> None:
    with _connect(server) as s:
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b'{"bytes": 5}' in first
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 200")


def test_headers_that_trickle_in_are_cut_off_with_408(server) -> None:
    with _connect(server) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a byte now and then: keeps an idle-only timeout from ever firing
            time.sleep(0.2)
            try:
                s.sendall(b"X")
            except OSError:
                break
        answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
        assert time.monotonic() - t0 < 3.0


def test_an_idle_kept_alive_connection_is_closed(server) -> None:
    with _connect(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert _read_all(s) == b""  # closed without another answer ...
        assert time.monotonic() - t0 < 3.0  # ... once the next request's headers were not there in time


def test_an_oversized_header_block_is_refused_before_it_is_read_in_full(server) -> None:
    with _connect(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            for _ in range(64):  # up to 4 MB, 64 KB at a time, never finishing the header
                s.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # the server closed the connection: what it had to say is still readable
            pass
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 431") and b"exceed 8192 bytes" in answer
    assert sent < 4 * 1024 * 1024


def test_a_body_that_stops_arriving_is_cut_off_and_the_app_sees_a_disconnect(server) -> None:
    events.clear()
    with _connect(server) as s:
        t0 = time.monotonic()
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        answer = _read_all(s)
        assert time.monotonic() - t0 < 3.0
    assert answer.startswith(b"HTTP/1.1 408") and b"paused for more than 0.5 s" in answer
    deadline = time.monotonic() + 2
    while "disconnect" not in events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert events == ["disconnect"]


def test_connections_past_the_limit_get_503(server) -> None:
    idle = [_connect(server) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.1)
        with _connect(server) as extra:
            answer = _read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"more than 4 open connections" in answer
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    with _connect(server) as s:  # the limit counts open connections: room again once they closed
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 200")
