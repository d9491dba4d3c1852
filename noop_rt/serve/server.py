"""The server's life: Ray (a local cluster unless given an address), the application deployed, the URL printed once
`/readyz` answers, then a wait for SIGINT/SIGTERM, a drain of the requests in flight, and a clean stop.

Draining: readiness turns false at once (a load balancer stops sending), requests still arriving are answered, and
the server stops once none has been in flight for `drain_quiet_s` (or after `drain_timeout_s`). A second signal
stops without waiting."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noop_rt.runtime import errors
from noop_rt.runtime.errors import BadInputError, MissingDependencyError, NoopError
from noop_rt.runtime.extras import install_hint
from noop_rt.runtime.local_ray import LOCAL_INIT, LOOPBACK_SWITCH
from noop_rt.serve.options import APP_NAME, ServeOptions

if TYPE_CHECKING:
    from noop_rt.api import LoadOptions

ROUTER_LOOP = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"
DIRECT_INGRESS_SETTINGS = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
                           "RAY_SERVE_PORT_QUARANTINE_S", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")
READY_TIMEOUT_S = 120.0  # after the deployment is up, the longest wait for the URL to answer /readyz
INGRESS_CPUS = 0.25


class _Signals:
    """SIGINT/SIGTERM: before the server is ready they abort the start (KeyboardInterrupt); after, they ask for a
    drain (and a second one for a stop without waiting)."""

    def __init__(self) -> None:
        self.ready = False
        self.stop = threading.Event()
        self.count = 0
        self.previous: dict[int, Any] = {}

    def handler(self, signum: int, frame: Any) -> None:
        if not self.ready:
            raise KeyboardInterrupt
        self.count += 1
        self.stop.set()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread hears signals (run_server in another thread runs until its process ends)
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, self.handler)
            self.previous.setdefault(sig, old)

    def restore(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _imports() -> tuple[Any, Any]:
    # This process calls the ingress through a handle from plain threads (the drain): its handles must route on a
    # loop of their own, whatever Serve mode is exported for the cluster (read once, when ray.serve is imported).
    saved = os.environ.get(ROUTER_LOOP)
    os.environ[ROUTER_LOOP] = "1"
    try:
        import fastapi  # noqa: F401
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingDependencyError(f"noop-rt serve needs Ray Serve ({exc.name or exc} is not installed): "
                                     f"{install_hint('serve')}") from None
    finally:
        if saved is None:
            os.environ.pop(ROUTER_LOOP, None)
        else:
            os.environ[ROUTER_LOOP] = saved
    if not any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart")):
        raise MissingDependencyError(f"noop-rt serve needs python-multipart (FastAPI's form parser): "
                                     f"{install_hint('serve')}")
    return ray, serve


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port, or "
                                "--port 0 for any free one)") from None


def url_for(host: str, port: int, tls: bool = False) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    scheme = "https" if tls else "http"
    return f"{scheme}://[{shown}]:{port}" if ":" in shown else f"{scheme}://{shown}:{port}"


def http_options(options: ServeOptions, host: str, port: int) -> dict[str, Any]:
    """Ray Serve's HTTPOptions for this server: where to listen, TLS, the keep-alive timeout (its uvicorn's)."""
    found: dict[str, Any] = {"host": host, "port": port, "keep_alive_timeout_s": options.keep_alive_s}
    if options.tls:
        found.update(ssl_certfile=options.ssl_certfile, ssl_keyfile=options.ssl_keyfile)
    return found


def serve_forever(load: LoadOptions, options: ServeOptions) -> None:
    address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
    port = options.port
    if port == 0:
        port = free_port(options.host)
    elif address is None:
        check_port(options.host, port)
    saved_switch = os.environ.get(LOOPBACK_SWITCH)
    if address is None:
        os.environ[LOOPBACK_SWITCH] = "0"  # a local cluster on loopback (runtime.local_ray), whatever --host says
    ray, serve = _imports()
    # Serve's own INFO lines name its proxy's port, which is not the server's URL under direct ingress; noop-rt
    # prints its own progress
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    _check_source(load)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    signals = _Signals()
    signals.install()
    own_ray = not ray.is_initialized()
    own_serve = started_serve = False
    # The local cluster's processes inherit this environment; this process's own Serve client read its settings
    # when ray.serve was imported (`_imports`).
    saved_env = {name: os.environ.get(name) for name in DIRECT_INGRESS_SETTINGS}
    saved_env[LOOPBACK_SWITCH] = saved_switch
    direct = own_ray and address is None and throughput_optimized(port)
    try:
        if own_ray:
            if address:
                _connect(ray, address)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, log_to_driver=False, logging_level="WARNING", **LOCAL_INIT)
        signals.install()  # ray.init sets its own SIGTERM handler
        local = own_ray and not address
        where = f"local cluster at {ray.get_runtime_context().gcs_address}" if local else f"cluster {address}"
        _log(f"Ray: {where}")
        if local and not _is_loopback_address(ray.get_runtime_context().gcs_address):
            _log("warning: the local Ray cluster listens beyond loopback (Ray was imported and set up before "
                 f"noop-rt could set {LOOPBACK_SWITCH}=0)")
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        model_cpus, threads = replica_resources(options, cpus, local)
        gpus_needed = options.gpus_per_replica * options.replicas
        if local and gpus_needed > float(resources.get("GPU", 0.0)):
            raise BadInputError(f"--gpus-per-replica {options.gpus_per_replica:g} x {options.replicas} replica(s) "
                                f"needs {gpus_needed:g} GPU(s); this machine has {resources.get('GPU', 0):g}")
        own_serve = not _serve_running(serve)
        # Direct ingress: the ingress replica listens on `port` itself; Serve's proxy (still started on the head
        # node) gets another free port, unused by noop-rt.
        _start_serve(serve, http_options(options, options.host, free_port(options.host) if direct else port))
        started_serve = True
        from noop_rt.serve.app import build_app

        app = build_app(load, options, model_cpus=model_cpus, ingress_cpus=INGRESS_CPUS, threads=threads)
        _log(f"starting {options.replicas} model replica(s) ({model_cpus:g} CPU"
             f"{f', {options.gpus_per_replica:g} GPU' if options.gpus_per_replica else ''}"
             f"{f', {threads} engine thread(s)' if threads else ''} each)...")
        try:
            handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except NoopError:
            raise
        except Exception as exc:  # RuntimeError from Serve, or a Ray actor error (ActorDiedError) when a replica's
            # constructor raised while the deployment was still being watched: the replicas' own message either way
            raise _deploy_error(serve, exc) from None
        url = url_for(options.host, port, options.tls)
        try:
            _wait_ready(url)
        except NoopError as exc:
            why = _last_line(_deployment_messages(serve).get("Ingress", "")) if direct else ""
            raise NoopError(f"{exc}{f'; the ingress replica says: {why}' if why else ''}") from None
        info = handle.model_info.remote().result(timeout_s=30)  # the handle: no API key needed from here
        signals.ready = True
        print(url, flush=True)
        _log(f"serving {info.get('name')} ({len(info.get('classes', []))} classes, method {info.get('method')}, "
             f"backend {info.get('backend')}) on {options.replicas} replica(s): {url}/docs (API), {url}/metrics, "
             f"{url}/v2/models/{info.get('name')}/infer (KServe v2); Ctrl-C or SIGTERM drains and stops")
        signals.stop.wait()
        _drain(handle, options, signals)
    finally:
        signals.restore()
        for name, value in saved_env.items():  # this process's environment as it was (run_server is an API too)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _stop(ray, serve if started_serve else None, own_ray=own_ray, own_serve=own_serve,
              local=own_ray and not address)


def _is_loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def ray_has_direct_ingress() -> bool:
    """Whether this Ray knows every setting `throughput_optimized` uses (Ray Serve 2.55 and later)."""
    from ray.serve._private import constants  # a probe of this Ray's settings, not a use of its internals

    return all(hasattr(constants, name) for name in DIRECT_INGRESS_SETTINGS)


def throughput_optimized(port: int) -> bool:
    """Ray Serve's throughput-optimized mode for the local cluster this server starts; True when its direct
    ingress is on, pinned to `port`.

    `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (Ray Serve's own switch, on unless set otherwise) carries requests between
    deployments over gRPC instead of Ray actor calls, runs user code on the replica's event loop and buffers the
    access log. Its direct ingress lets the ingress replica answer HTTP itself: no hop through Serve's HTTP proxy
    actor. On 2 cores this cut Ray Serve's own CPU per request from 22-32 ms to 4.5-6 ms
    (benchmarks/serve_overhead.py, an ingress calling a second deployment). The ingress replica then listens on a
    port from a pool (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT), set here to `port` alone, and a replaced replica
    gets it back at once (no quarantine). noop-rt's own drain (readiness false until no request is in flight)
    replaces Serve's 30 s minimum draining period. RAY_SERVE_THROUGHPUT_OPTIMIZED=0 brings back Serve's classic HTTP
    proxy, which is also what a Ray without these settings (before 2.55) runs."""
    if not ray_has_direct_ingress():
        return False
    env = os.environ
    optimized = env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1") == "1"
    if env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1" if optimized else "0") != "1":
        return False
    env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
    env.setdefault("RAY_SERVE_PORT_QUARANTINE_S", "0")
    env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    return True


def _connect(ray: Any, address: str) -> None:
    m = re.fullmatch(r"\[?([\w.:-]+?)\]?:(\d+)", address)
    if m:  # a GCS address: refuse fast when nothing listens there (ray.init would retry for minutes)
        try:
            socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
        except OSError as exc:
            raise BadInputError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = (" (a cluster with token authentication: set RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token"
                " or RAY_AUTH_TOKEN)" if "auth" in str(exc).lower() else "")
        raise BadInputError(f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}{hint}") from None


def _check_source(load: LoadOptions) -> None:
    """A mistyped path is one line now, not three failed replica starts later."""
    from noop_rt.runtime.opener import source_kind

    source, kind = load.source, load.kind
    if kind is None:
        source_kind(source)
    elif source is not None and str(source) != "demo" and not Path(source).expanduser().exists():
        raise BadInputError(f"{kind} not found: {source}")


def _serve_running(serve: Any) -> bool:
    try:
        return bool(serve.status().applications)
    except Exception:  # no Serve controller on this cluster yet
        return False


def replica_resources(options: ServeOptions, cpus: float, local: bool) -> tuple[float, int | None]:
    """(CPUs reserved per model replica, engine threads per replica; None: the engine's default).

    `--threads` wins. Otherwise, on a local cluster: one replica gets a thread per core, given explicitly, so that
    onnxruntime's threads wait without spinning: the replica runs two batches at once (`app.concurrent_batches`),
    and the HTTP side shares the cores (the backend is not known here; on the others a thread per core is their
    own default anyway). With `--concurrent-batches 1` it keeps the engine's default instead
    (onnxruntime's threads spin between its kernels: the lowest latency for one request at a time). Several
    replicas split the cores but one (left to the HTTP side), a share of threads each. On a cluster each replica
    reserves one CPU and keeps the engine's default."""
    if not local:
        return 1.0, options.threads
    share = math.floor(100 * (cpus - INGRESS_CPUS) / options.replicas) / 100
    if share <= 0:
        raise BadInputError(f"{options.replicas} replicas do not fit on this machine's {cpus:g} CPUs: use fewer "
                            "--replicas, or --ray ADDRESS for a cluster")
    if options.threads is not None:
        return share, options.threads
    if options.replicas == 1:
        return share, None if options.concurrent_batches == 1 else max(1, int(cpus))
    return share, max(1, int((cpus - 1) // options.replicas))


def _start_serve(serve: Any, http: dict[str, Any]) -> None:
    """serve.start, once more if Serve's controller actor died while starting (seen on a loaded 2-core machine);
    a second failure is one line."""
    for attempt in (1, 2):
        try:
            serve.start(http_options=http)
            return
        except Exception as exc:  # Ray raises its own actor errors (ActorDiedError, RayActorError)
            if attempt == 2 or "Actor" not in type(exc).__name__:
                raise NoopError(f"Ray Serve did not start: {type(exc).__name__}: {_first_line(exc)}") from None
            _log(f"Ray Serve's controller died while starting ({type(exc).__name__}); starting it again")
            with contextlib.suppress(Exception):
                serve.shutdown()


def _deploy_error(serve: Any, exc: Exception) -> NoopError:
    """The replicas' own error (a noop_rt error raised while opening the model) as one line, when there is one."""
    deadline = time.monotonic() + 10.0  # a replica's error can reach Serve's status after the failure surfaced here
    while True:
        message = "\n".join([str(exc), *_deployment_messages(serve).values()])
        found = re.findall(r"noop_rt\.errors\.(\w+): (.+)", message)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if found:
        name, text = found[-1]
        cls = getattr(errors, name, NoopError)
        return cls(text.strip()) if isinstance(cls, type) and issubclass(cls, NoopError) else NoopError(text)
    return NoopError(f"the model replicas failed to start: {_last_line(message) or exc}")


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    # this process asks its own server whether it answers yet: under TLS the certificate is not what is checked
    # (it may name a host other than the one asked here)
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10, context=context) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise NoopError(f"the application is deployed but {url}/readyz did not answer 200 within "
                    f"{READY_TIMEOUT_S:g} s ({last}); if Serve already ran on this cluster, it keeps its own "
                    "host and port")


def _drain(handle: Any, options: ServeOptions, signals: _Signals) -> None:
    _log("draining: readiness is now false; waiting for the requests in flight...")
    try:
        handle.drain.remote().result(timeout_s=10)
        deadline = time.monotonic() + options.drain_timeout_s
        while time.monotonic() < deadline and signals.count < 2:
            state = handle.state.remote().result(timeout_s=10)
            if state["inflight"] == 0 and state["idle_s"] >= options.drain_quiet_s:
                _log("drained")
                return
            time.sleep(0.05)
        _log("stopping without waiting longer" if signals.count >= 2 else
             f"drain timeout ({options.drain_timeout_s:g} s): stopping with requests in flight")
    except Exception as exc:  # the ingress is gone: nothing left to drain
        _log(f"drain: {_first_line(exc)}")


def _deployment_messages(serve: Any) -> dict[str, str]:
    """What Serve's status says of each of the application's deployments (empty when it cannot say)."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:
        return {}
    return {name: str(dep.message or "") for name, dep in deployments.items()}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _stop(ray: Any, serve: Any | None, *, own_ray: bool, own_serve: bool, local: bool) -> None:
    """Stop what this server started: Serve (or only its application, on a cluster where Serve ran already), then
    its own local cluster. Ray's own remarks while it stops go to stderr: stdout holds the URL only."""
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if serve is not None:
                if own_serve or local:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)
        except Exception as exc:
            _log(f"stopping Serve: {_first_line(exc)}")
        if own_ray:
            ray.shutdown()
