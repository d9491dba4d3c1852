"""`noop-rt serve` in a child process, for tests and benchmarks: started on a free port (`--port 0`), ready when it
prints its URL, stopped with a signal like any deployment would stop it. The child runs in its own process group
so that whatever it leaves behind (its local Ray cluster) can be cleaned up by that group's id."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

URL = re.compile(r"^https?://\S+$")
RAY_LINE = re.compile(r"^Ray: local cluster at (\S+)")


class ServerProcess:
    """`with ServerProcess(["--replicas", "2"]) as server: httpx.get(server.url + "/readyz")`."""

    def __init__(self, args: Sequence[str] = (), *, start_timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.args = ["--port", "0", *args]
        self.start_timeout_s = start_timeout_s
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._url_ready = threading.Event()

    @property
    def ray_address(self) -> str | None:
        """The GCS address of the local cluster the server started (None when it joined an existing one)."""
        for line in self.stderr:
            m = RAY_LINE.match(line)
            if m:
                return m.group(1)
        return None

    def start(self) -> str:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(self.env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "noop_rt", "serve", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._url_ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"noop-rt serve did not print its URL (exit code {self.proc.returncode}):\n"
                                   + self.tail())
        return self.url

    def _read(self, stream: object, sink: list[str], is_stdout: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            line = line.rstrip("\n")
            sink.append(line)
            if is_stdout and not self.url and URL.match(line.strip()):
                self.url = line.strip()
                self._url_ready.set()

    def processes(self) -> list[Any]:
        """psutil.Process of the server and of everything it started (its session: its local Ray cluster)."""
        import psutil

        if self.proc is None:
            return []
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == self.proc.pid:
                    found.append(p)
        return found

    def listening(self) -> list[tuple[str, int, str]]:
        """(address, port, process name) of every TCP socket the server and its cluster listen on."""
        import psutil

        found = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                name = p.name()
                found += [(c.laddr.ip, c.laddr.port, name) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        return sorted(found)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.stderr[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 120.0) -> int:
        """Signal the server and wait for it to exit; its exit code (the process group is killed past the
        timeout)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode if self.proc.returncode is not None else -9)

    def kill(self) -> None:
        """SIGKILL the server's process group (the server and what it started), if it is still there."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self.kill()


def public_sockets(sockets: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Those of `ServerProcess.listening()` on an address other than a loopback one (all interfaces included)."""
    import ipaddress

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        return bool((mapped or address).is_loopback)

    return [s for s in sockets if not loopback(s[0])]
