"""HTTP limits at the connection, below the application: a slow or idle client is cut off, an oversized header block
is refused before it is buffered, and the number of open connections is bounded.

Ray Serve starts the ingress's uvicorn server itself (`ray.serve._private.http_util.start_asgi_http_server`) with a
fixed set of settings: its `HTTPOptions` carry the host, the port, TLS and the keep-alive timeout, nothing else, and
uvicorn itself has no timeout for a request's headers or body. So the ingress replica (`install`, called before Serve
starts its HTTP server, in the replica's own process) names this module's protocol as uvicorn's "auto" HTTP protocol:
uvicorn's own (httptools when installed, else h11), with four checks around it:

- the request line and headers must arrive within `header_timeout_s` of the connection (or of the previous response
  on a kept-alive one), else 408 and the connection is closed (slowloris; a connection that sent nothing is closed
  without an answer);
- they must fit in `max_header_bytes`, counted as they arrive, else 431 and closed: nothing larger is buffered;
- a request body may pause for at most `body_timeout_s`, else the connection is closed (the request, if the
  application is reading it, sees a client disconnect: 499);
- at most `max_connections` are open at once; one more is answered 503 and closed.

The number of header fields is checked by the application (`app`), where a refusal is a JSON answer.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

LIMITS_ENV = "NOOP_RT_HTTP_LIMITS"  # set in the ingress replica's process by `install`, read by each connection
PROTOCOL = "noop_rt.serve.http_limits:LimitedHTTPProtocol"


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1000


def install(limits: HttpLimits) -> None:
    """From here on, uvicorn servers started in this process (Serve's, for this replica) use LimitedHTTPProtocol."""
    import uvicorn.config

    os.environ[LIMITS_ENV] = json.dumps(asdict(limits))
    uvicorn.config.HTTP_PROTOCOLS["auto"] = PROTOCOL


@lru_cache(maxsize=4)
def _parse(text: str) -> HttpLimits:
    return HttpLimits(**json.loads(text)) if text else HttpLimits()


def current_limits() -> HttpLimits:
    return _parse(os.environ.get(LIMITS_ENV, ""))


def _answer(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class LimitedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol with the limits of `current_limits()` (see the module's description)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = current_limits()
        self.header_bytes = 0  # bytes received since the last complete header block
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------------------ uvicorn's hooks
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Service Unavailable", f"more than {self.limits.max_connections} open connections "
                                                     "(--max-connections): try again later")
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        reading_headers = before is None or not before.more_body
        if reading_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_timers()
            return
        if self.cycle is not before:  # a header block arrived in full
            self.header_bytes = 0
            self._cancel(self.header_timer)
            self.header_timer = None
        elif reading_headers and self.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "Request Header Fields Too Large", f"the request line and headers exceed "
                                                                 f"{self.limits.max_header_bytes} bytes")
            return
        cycle = self.cycle
        self._cancel(self.body_timer)
        self.body_timer = None
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel(self.body_timer)
        self.body_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the next request on this kept-alive connection

    # ------------------------------------------------------------------------------------------ the limits
    def _arm_header_timer(self) -> None:
        self._cancel(self.header_timer)
        self.header_bytes = 0
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return
        if self.header_bytes == 0:  # nothing of a request yet: an idle connection, closed without a word
            self.transport.close()
        else:
            self._refuse(408, "Request Timeout", f"the request's headers did not arrive within "
                                                 f"{self.limits.header_timeout_s:g} s")

    def _body_timeout(self) -> None:
        self.body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if not cycle.response_started:
            self.transport.write(_answer(408, "Request Timeout", f"the request body paused for more than "
                                                                 f"{self.limits.body_timeout_s:g} s"))
        self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._cancel_timers()
        self.transport.write(_answer(status, reason, message))
        self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel(self.header_timer)
        self._cancel(self.body_timer)
        self.header_timer = self.body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()
