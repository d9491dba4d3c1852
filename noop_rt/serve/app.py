"""The Ray Serve application: a FastAPI ingress in front of the model replicas. (Over 500 lines: Ray Serve binds the
FastAPI routes to the ingress deployment class where it is defined, so the routes, the two deployments and `build_app`
that composes them stay in one module; the protocol and upload parsing live in kserve.py and uploads.py.)

- `Model` replicas: each opens one classifier with `noop_rt.load`, runs one warm-up pass, then answers `classify`
  calls of ONE preprocessed image each; `@serve.batch` gathers the calls that arrive together into one
  `Classifier.classify` over (B, 3, R, R): one B*C UNet batch (chunked to the model's max batch), up to
  `concurrent_batches` of them at once.
- `Ingress` (one replica): HTTP. Reads bodies under the upload limit, refuses non-images (415), bombs (400, from the
  header) and empty bodies (400) before the model sees them, decodes and preprocesses in threads, sends each image to
  the model deployment and assembles the answers: `/v1/classify`, `/v1/model`, the KServe v2 protocol, `/healthz`,
  `/readyz`, `/metrics`, the page at `/`. It tracks requests in flight so the server can drain them on SIGTERM.

Metrics: Ray Serve's own (requests by route and status, the HTTP latency histogram, errors, `@serve.batch` sizes and
waits) plus a few of noop-rt's (`noop_rt_*`), all through Ray's Prometheus exporter; `GET /metrics` relays this
node's exporter, filtered to those families (`?all=true` for every Ray metric).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from ray.util import metrics
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from noop_rt import __version__
from noop_rt.api import LoadOptions
from noop_rt.runtime.errors import BadInputError
from noop_rt.serve import kserve
from noop_rt.serve.auth import CHALLENGE, DIGESTS_ENV, OPEN_PATHS, authorized
from noop_rt.serve.http_limits import HttpLimits, install
from noop_rt.serve.options import ServeOptions
from noop_rt.serve.origins import (
    ALLOWED_HOSTS_ENV,
    CORS_ORIGINS_ENV,
    PREFLIGHT_HEADERS,
    UNSAFE_METHODS,
    cors_headers,
    cross_origin,
    default_allowed_hosts,
    host_allowed,
)
from noop_rt.serve.private_ray import keep_grpc_on_loopback
from noop_rt.serve.uploads import (
    RequestError,
    check_declared_length,
    check_float_images,
    check_request_pixels,
    decode_image,
    inflate,
    read_body,
)

MAX_HEADERS_ENV = "NOOP_RT_MAX_HEADERS"  # --max-headers, set in the ingress replica's process
PROBES = OPEN_PATHS - {"/"}  # answered whatever the Host (an orchestrator's probe names the pod's address)
SLICES_IN_FLIGHT = 1  # a request's slices of --max-batch-size images queued or running at once: one, so that while
# a replica runs one of its slices, its other concurrent batch serves the other requests
MODEL_TIMEOUT_S = 5.0  # longest wait for a model replica to answer a readiness/metadata question
READY_FRESH_S = 10.0  # a model answer this recent makes /readyz true without asking again
METRIC_PREFIXES = ("ray_serve_", "ray_noop_rt_", "noop_rt_")
MANIFEST_SUMMARY = ("format", "version", "name", "noop_rt_version", "created", "source_ckpt", "backbone", "template",
                    "t_star", "loss", "tau", "resolution", "precision", "opset", "max_batch", "scorer_losses")

api = FastAPI(
    title="noop-rt",
    version=__version__,
    description="Diffusion classifier (NoOp) on Ray Serve. `POST /v1/classify` with image files (multipart) or a raw "
                "image body answers the `noop-rt classify --json` objects plus server timings; the KServe v2 "
                "protocol (`/v2/...`) answers standard clients such as tritonclient.",
    docs_url=None,  # /docs is the ingress's own route: Swagger UI from a package, so it works offline
)
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def _swagger_ui_dir() -> Path | None:
    """Swagger UI's files as the fastapi-offline package ships them (the serve extra); None where it is missing."""
    try:
        folder = Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


# The page: its own inline script and style, images it previews from blob: URLs, calls to this origin only, never in a
# frame of another site.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
                                           "'unsafe-inline'; img-src 'self' blob: data:; frame-ancestors 'none'; "
                                           "base-uri 'none'; form-action 'none'",
                "Referrer-Policy": "no-referrer"}


@api.middleware("http")
async def _require_key(request: Request, call_next: Any) -> Response:
    """401 with a Bearer challenge, before any route runs, for a request without one of the configured keys. The
    digests are read from this process's environment, which the ingress replica sets when it starts (module state
    would not do: Ray Serve may ship the app and the deployment class as separate copies)."""
    digests = [d for d in os.environ.get(DIGESTS_ENV, "").split(",") if d]
    if digests and request.url.path not in OPEN_PATHS and not authorized(request.headers.get("authorization"),
                                                                          digests):
        return JSONResponse({"error": "missing or wrong API key: send the header Authorization: Bearer KEY"},
                            status_code=401, headers=CHALLENGE)
    return await call_next(request)


@api.middleware("http")
async def _header_count(request: Request, call_next: Any) -> Response:
    """431 for a request with more header fields than --max-headers (their bytes are bounded below the
    application, by http_limits)."""
    limit = int(os.environ.get(MAX_HEADERS_ENV, "0") or 0)
    if limit and len(request.scope["headers"]) > limit:
        return JSONResponse({"error": f"{len(request.scope['headers'])} header fields; the limit is {limit} "
                                      "(--max-headers)"}, status_code=431)
    return await call_next(request)


@api.middleware("http")
async def _browsers(request: Request, call_next: Any) -> Response:
    """The Host a request names (--allowed-hosts: DNS rebinding) and the web origin it comes from (--cors-origin; a
    state-changing request from another origin is refused): serve.origins. Outside the key check, so that a CORS
    preflight (which carries no key) is answered."""
    host = request.headers.get("host")
    allowed = [h for h in os.environ.get(ALLOWED_HOSTS_ENV, "*").split(",") if h]
    if request.url.path not in PROBES and not host_allowed(host, allowed):
        return JSONResponse({"error": f"Host {host!r} is not served here (--allowed-hosts)"}, status_code=400)
    origin = request.headers.get("origin")
    if not cross_origin(origin, host, request.url.scheme, request.headers.get("sec-fetch-site")):
        return await call_next(request)
    permitted = origin is not None and origin.lower() in os.environ.get(CORS_ORIGINS_ENV, "").split(",")
    if request.method == "OPTIONS" and request.headers.get("access-control-request-method"):
        if permitted:
            return Response(status_code=204, headers={**cors_headers(origin or ""), **PREFLIGHT_HEADERS})
        return JSONResponse({"error": f"origin {origin} may not call this server (--cors-origin)"}, status_code=403)
    if not permitted and request.method in UNSAFE_METHODS:
        return JSONResponse({"error": f"a {request.method} from another web origin ({origin or 'a cross-site page'}) "
                                      "is refused (--cors-origin names the ones allowed)"}, status_code=403)
    response = await call_next(request)
    if permitted:
        response.headers.update(cors_headers(origin or ""))
    return response


@api.middleware("http")
async def _no_sniff(request: Request, call_next: Any) -> Response:
    """Every answer's type is the one it declares: browsers must not guess another (an upload echoed as HTML).
    Registered last, so it is the outermost: the key check's 401s carry it too."""
    response = await call_next(request)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)


@api.exception_handler(ClientDisconnect)
async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away before its request was read in full: one line in the log, and 499 (nginx's "client
    closed request") in the metrics, never a 500. Nobody is left to read the answer."""
    client = request.client
    print(f"client {client.host if client else '?'}:{client.port if client else '?'} disconnected during "
          f"{request.method} {request.url.path}: answered 499", file=sys.stderr, flush=True)
    return Response(status_code=499)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return JSONResponse({"error": f"internal error: {line}"}, status_code=500)


CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "One or more image files (any field name)."}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


# ---------------------------------------------------------------------------------------------- helpers
# Defined before the deployments: Ray Serve pickles the deployment classes when they are decorated.
def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def _awaitable(response: Any) -> Any:
    async def wait() -> Any:
        return await response

    return wait()


def _replay(body: bytes) -> Any:
    """An ASGI `receive` that hands over an already-read body once."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _node_metrics_url() -> str | None:
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode("utf-8", errors="replace")


def _families(text: str, prefixes: tuple[str, ...]) -> str:
    """The Prometheus text of the metric families whose names start with `prefixes` (HELP/TYPE lines included)."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split()
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(prefixes):
            keep.append(line)
    return "\n".join(keep) + "\n"


ONNXRUNTIME_CONCURRENT_BATCHES = 2  # a replica's batches at once on onnxruntime unless --concurrent-batches says


def concurrent_batches(options: ServeOptions, backend: str) -> int:
    """Batches one replica runs at once: `--concurrent-batches`, else 2 on onnxruntime, whose sessions run calls
    concurrently; always 1 on the other engines, which hold one inference request (OpenVINO), one execution context
    and its buffers (TensorRT) or static CUDA-graph buffers (torch) per shape. Two batches at once keep every core
    busy with useful work when the HTTP side takes a share of them, where one batch's threads would wait for each
    other (on 2 cores: 2 single-thread calls at once ran 38 images/s against 25-29 for one 2-thread call at a time,
    ad-hoc, in process)."""
    wanted = options.concurrent_batches
    if backend != "onnxruntime":
        if wanted is not None and wanted > 1:
            raise BadInputError(f"--concurrent-batches {wanted} needs the onnxruntime backend; {backend} runs one "
                                "batch at a time (leave --concurrent-batches unset, or use --replicas)")
        return 1
    return ONNXRUNTIME_CONCURRENT_BATCHES if wanted is None else wanted


# ---------------------------------------------------------------------------------------------- model replicas
@serve.deployment(name="Model")
class ModelReplica:
    """One classifier. `classify(image, top_k)` is called once per image; the calls that arrive together become one
    batch."""

    def __init__(self, load: LoadOptions, options: ServeOptions, threads: int | None) -> None:
        from noop_rt.api import load as open_model

        keep_grpc_on_loopback()

        if load.threads is None and threads is not None:
            load = load.updated(threads=threads)
        self.classifier = open_model(load)
        self.threads = load.threads
        self.concurrent = concurrent_batches(options, self.classifier.backend)
        self.classify_batch = serve.batch(max_batch_size=options.max_batch_size,
                                          batch_wait_timeout_s=options.batch_wait_ms / 1000.0,
                                          max_concurrent_batches=self.concurrent)(self._classify_batch)
        r = self.classifier.resolution
        self.classifier.score(np.zeros((1, 3, r, r), dtype=np.float32))  # the warm-up pass (not seen by drift)
        self.running = 0  # batches in the model
        self.free = asyncio.Event()  # set when a batch ends
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.batch_ms = metrics.Histogram(
            "noop_rt_batch_inference_ms", description="Model time of one batch (all its images), milliseconds.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000])
        self.images = metrics.Counter("noop_rt_images_classified", description="Images classified by the model.")
        self.drift_share = metrics.Gauge(
            "noop_rt_drift_share_below_val_p05", description="Share of the images classified so far whose top-1 "
            "probability is below the validation split's 5th percentile (about 0.05 on the few-shot domain).")
        self.classifier.on_drift = lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)

    def describe(self) -> dict[str, Any]:
        clf = self.classifier
        info = clf.info
        manifest = info.manifest
        summary = None
        if manifest is not None:
            summary = {k: manifest[k] for k in MANIFEST_SUMMARY if k in manifest}
            summary["classifier_graph"] = manifest.get("classifier_graph", {}).get("file")
            summary["files"] = len(manifest.get("files", {}))
            summary["bytes"] = sum(int(f.get("size", 0)) for f in manifest.get("files", {}).values())
            summary["export_command"] = (manifest.get("build_config") or {}).get("command")
        return {"name": info.name, "classes": list(clf.classes), "method": clf.method, "backend": clf.backend,
                "device": clf.device, "resolution": clf.resolution, "source": info.source,
                "location": info.location, "calibrated": clf.calibrated(clf.method, clf.config()),
                "threads": self.threads, "concurrent_batches": self.concurrent, "notes": clf.notes,
                "drift": clf.drift_report(), "manifest": summary}

    def ready(self) -> bool:
        return True  # answering at all means the constructor (open + warm-up) finished

    async def classify(self, image: np.ndarray, top_k: int) -> dict[str, Any]:
        arrived = time.perf_counter()
        # Serve forms the next batch as soon as its wait ends, even while the model is still busy with the last ones;
        # held here until a batch ends, the requests that arrive meanwhile form the next batch together.
        while self.running >= self.concurrent:
            self.free.clear()
            await self.free.wait()
        return await self.classify_batch(image, top_k, arrived)

    async def _classify_batch(self, images: list[np.ndarray], top_ks: list[int], arrived: list[float]) \
            -> list[dict[str, Any]]:
        """The batch `@serve.batch` gathered (`classify_batch`, set up per replica): one `classify` call."""
        start = time.perf_counter()
        batch = np.stack(images)
        n_classes = len(self.classifier.classes)
        self.running += 1
        try:  # in a thread: the replica still answers ready/describe (and health checks) meanwhile
            results = await asyncio.to_thread(self.classifier.classify, batch, top_k=n_classes)
        finally:
            self.running -= 1
            self.free.set()
        model_ms = 1e3 * (time.perf_counter() - start)
        self.batch_ms.observe(model_ms)
        self.images.inc(len(images))
        drift = self.classifier.drift_report()
        if drift is not None and drift["seen"]:
            self.drift_share.set(drift["share_below_val_p05_top1_prob"])
        index = {c: i for i, c in enumerate(self.classifier.classes)}
        out = []
        for result, k, t in zip(results, top_ks, arrived, strict=True):
            obj = result.to_json()  # every class, ranked: the KServe probabilities, then the client's top-k
            probs = np.zeros(n_classes, dtype=np.float32)
            for s in obj["top"]:
                probs[index[s["class"]]] = s["prob"]
            obj["top"] = obj["top"][:max(1, k)]
            out.append({"result": obj, "label": obj["top"][0]["class"], "probs": probs,
                        "queue_ms": round(1e3 * (start - t), 3), "batch_size": len(images),
                        "inference_ms": round(model_ms, 3), "replica": self.replica})
        return out


# ---------------------------------------------------------------------------------------------- ingress
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in front of the model deployment."""

    def __init__(self, model: DeploymentHandle, options: ServeOptions) -> None:
        keep_grpc_on_loopback()
        os.environ[DIGESTS_ENV] = ",".join(options.api_key_digests)
        os.environ[MAX_HEADERS_ENV] = str(options.max_headers)
        os.environ[ALLOWED_HOSTS_ENV] = ",".join(options.allowed_hosts or default_allowed_hosts(options.host))
        os.environ[CORS_ORIGINS_ENV] = ",".join(options.cors_origins)
        # before Serve starts this replica's HTTP server (after this constructor): its connections get the limits
        install(HttpLimits(header_timeout_s=options.header_timeout_s, body_timeout_s=options.body_timeout_s,
                           max_header_bytes=options.max_header_bytes, max_connections=options.max_connections))
        self.decode_slots = asyncio.Semaphore(os.cpu_count() or 1)  # decodes at once in this replica
        # A handle made here takes this replica's Serve settings (gRPC to the model replicas in Serve's
        # throughput-optimized mode); the one passed in keeps those of the process that built the application.
        self.model = serve.get_deployment_handle(model.deployment_name, app_name=model.app_name, _check_exists=False)
        self.options = options
        self.draining = False
        self.inflight = 0
        self.idle_since = time.monotonic()
        self.model_ok_at = 0.0  # monotonic time of the last good answer from a model replica
        self.info: dict[str, Any] | None = None
        self.page_html = (files("noop_rt.serve") / "page.html").read_text(encoding="utf-8")
        self.metrics_url: str | None = None
        self.rejected = metrics.Counter("noop_rt_rejected_requests", description="Requests refused before the model "
                                        "(bad input, over the limits), by status code.", tag_keys=("code",))
        self.failed = metrics.Counter("noop_rt_model_failures", description="Requests answered 5xx because no model "
                                      "replica could answer (e.g. one died mid-request).", tag_keys=("code",))

    # ------------------------------------------------------------------------------------------ bookkeeping
    @contextlib.contextmanager
    def _work(self) -> Iterator[None]:
        """One request doing work: counted in flight (for the drain) and in the metrics when refused."""
        self.inflight += 1
        try:
            yield
        except RequestError as exc:
            (self.failed if exc.status >= 500 else self.rejected).inc(tags={"code": str(exc.status)})
            raise
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle_since = time.monotonic()

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """The request's deadline: past --request-timeout-s it answers 504, and its pending model calls are
        cancelled (the images not yet in a batch never reach one)."""
        try:
            async with asyncio.timeout(self.options.request_timeout_s):
                yield
        except TimeoutError:
            raise RequestError(504, f"the request took longer than {self.options.request_timeout_s:g} s "
                                    "(--request-timeout-s); its remaining work was dropped") from None

    async def drain(self) -> None:
        """Called by the server on SIGTERM/SIGINT: readiness turns false; requests still arriving are answered."""
        self.draining = True

    async def state(self) -> dict[str, Any]:
        idle = time.monotonic() - self.idle_since if self.inflight == 0 else 0.0
        return {"inflight": self.inflight, "idle_s": idle, "draining": self.draining}

    async def _model_info(self) -> dict[str, Any]:
        if self.info is None:
            try:
                self.info = await asyncio.wait_for(_awaitable(self.model.describe.remote()), MODEL_TIMEOUT_S)
            except TimeoutError:
                raise RequestError(503, f"no model replica answered within {MODEL_TIMEOUT_S:g} s (still loading?)") \
                    from None
            except (ray.exceptions.RayActorError, RayServeException) as exc:
                raise RequestError(503, f"model replica unavailable: {_one_line(exc)}") from None
            self.model_ok_at = time.monotonic()
        return self.info

    async def _not_ready(self) -> str | None:
        """Why the server is not ready, or None."""
        if self.draining:
            return "draining"
        if time.monotonic() - self.model_ok_at < READY_FRESH_S:
            return None
        try:
            await asyncio.wait_for(_awaitable(self.model.ready.remote()), MODEL_TIMEOUT_S)
        except TimeoutError:
            return f"no model replica answered within {MODEL_TIMEOUT_S:g} s"
        except Exception as exc:
            return f"model replica unavailable: {_one_line(exc)}"
        self.model_ok_at = time.monotonic()
        return None

    async def _body(self, request: Request) -> bytes:
        limit = self.options.max_upload_bytes
        check_declared_length(request.headers.get("content-length"), limit)
        body = await read_body(request.stream(), limit)
        return inflate(body, request.headers.get("content-encoding"), limit)

    async def _uploads(self, request: Request) -> list[tuple[str | None, bytes]]:
        """(file name, bytes) of each image: the files of a multipart form, or the raw body."""
        body = await self._body(request)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            if not body:
                raise RequestError(400, "empty request body: send an image file (raw body, e.g. curl --data-binary "
                                        "@img.png) or multipart files (curl -F file=@img.png)")
            return [(None, body)]
        replay = Request(request.scope, _replay(body))
        try:
            form = await replay.form(max_files=self.options.max_files, max_fields=self.options.max_files)
        except StarletteHTTPException as exc:
            raise RequestError(400, f"bad multipart form: {exc.detail}") from None
        except Exception as exc:  # python-multipart's own parse errors
            raise RequestError(400, f"bad multipart form: {exc}") from None
        try:
            uploads = [(item.filename or key, await item.read()) for key, item in form.multi_items()
                       if isinstance(item, UploadFile)]
        finally:
            await form.close()
        if not uploads:
            raise RequestError(400, "the form holds no file: send image files as form fields (curl -F file=@img.png)")
        return uploads

    async def _decode(self, uploads: list[tuple[str | None, bytes]], resolution: int) \
            -> list[tuple[np.ndarray, float]]:
        """Each upload as the model's input, with the ms it took; the first bad one fails the request. Every header
        is checked first (per image and for the request in all); then at most one image per core decodes at a time
        in this replica, whatever the number of requests (the others wait their turn)."""
        max_pixels, budget = self.options.pixel_limits(resolution)
        named = [(name or "the request body", data) for name, data in uploads]
        check_request_pixels(named, max_pixels, budget)

        def one(name: str, data: bytes) -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            array = decode_image(data, name, resolution, max_pixels)
            return array, 1e3 * (time.perf_counter() - t0)

        async def bounded(name: str, data: bytes) -> tuple[np.ndarray, float]:
            async with self.decode_slots:
                return await asyncio.to_thread(one, name, data)

        return list(await asyncio.gather(*(bounded(name, data) for name, data in named)))

    async def _classify(self, image: np.ndarray, top_k: int) -> dict[str, Any]:
        """One image through the model deployment. A replica that dies mid-request is retried once on another;
        then the request gets a 503, never silence."""
        for attempt in (1, 2):
            try:
                out = await self.model.classify.remote(image, top_k)
            except BadInputError as exc:  # raised inside the replica (its RayTaskError is also a BadInputError)
                raise RequestError(400, str(getattr(exc, "cause", None) or exc)) from None
            except (ray.exceptions.RayActorError, RayServeException, grpc.aio.AioRpcError) as exc:  # gRPC: Serve's
                # throughput-optimized transport, whose errors from a replica dying mid-call are not all actor errors
                if attempt == 2:
                    raise RequestError(503, f"model replica unavailable: {type(exc).__name__}; retry") from None
                continue
            self.model_ok_at = time.monotonic()
            return out
        raise AssertionError("unreachable")

    async def _classify_all(self, arrays: list[np.ndarray], top_k: int) -> list[dict[str, Any]]:
        """The images of one request, in order, sent to the model in slices of --max-batch-size, `SLICES_IN_FLIGHT`
        slice of this request queued or running at a time: a request of many images cannot fill the model's queue
        ahead of everyone else's (a concurrent request's image waits for at most a slice, not for all of them)."""
        size = self.options.max_batch_size
        slots = asyncio.Semaphore(SLICES_IN_FLIGHT)
        outs: list[dict[str, Any]] = [{} for _ in arrays]

        async def one_slice(start: int) -> None:
            async with slots:
                done = await asyncio.gather(*(self._classify(a, top_k) for a in arrays[start:start + size]))
            outs[start:start + len(done)] = done

        await asyncio.gather(*(one_slice(start) for start in range(0, len(arrays), size)))
        return outs

    # ------------------------------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html, headers=PAGE_HEADERS)

    @api.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        """Swagger UI over this API's OpenAPI document, its scripts served from here (no CDN, so offline too)."""
        from fastapi.openapi.docs import get_swagger_ui_html

        local = _swagger_ui_dir() is not None
        assets = {"swagger_js_url": "docs-assets/swagger-ui-bundle.js", "swagger_css_url": "docs-assets/swagger-ui.css",
                  "swagger_favicon_url": "docs-assets/favicon.png"} if local else {}
        return get_swagger_ui_html(openapi_url="openapi.json", title="noop-rt API", **assets)

    @api.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(self, name: str) -> Response:
        folder = _swagger_ui_dir()
        if folder is None or name not in DOCS_ASSETS:
            return JSONResponse({"error": f"no such file: {name}"}, status_code=404)
        return Response((folder / name).read_bytes(), media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "max-age=86400"})

    @api.get("/healthz", summary="Liveness: the server process is up.")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "draining": self.draining, "inflight": self.inflight}

    @api.get("/readyz", summary="Readiness: the model is loaded and warmed up, and the server is not draining.")
    async def readyz(self) -> JSONResponse:
        reason = await self._not_ready()
        if reason is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @api.get("/v1/model", summary="The model: classes, method, backend, a summary of the bundle manifest.")
    async def model_info(self) -> dict[str, Any]:
        info = await self._model_info()
        o = self.options
        max_pixels, max_request_pixels = o.pixel_limits(int(info["resolution"]))
        return {**info, "version": __version__,
                "server": {"replicas": o.replicas, "max_batch_size": o.max_batch_size, "batch_wait_ms": o.batch_wait_ms,
                           "max_upload_mb": o.max_upload_mb, "max_pixels": max_pixels,
                           "max_request_pixels": max_request_pixels, "max_files": o.max_files, "top_k": o.top_k},
                "kserve": {"model": info["name"], "infer": f"/v2/models/{info['name']}/infer"}}

    @api.post("/v1/classify", openapi_extra=CLASSIFY_BODY,
              summary="Classify image files (multipart, one or more) or a raw image body.",
              description="Answers a list with one `noop-rt classify --json` object per image, plus `server`: "
                          "queue_ms (wait for the batch), batch_size (images in the batch it rode in), decode_ms, "
                          "inference_ms (the whole batch), total_ms (this request in the server).")
    async def classify(self, request: Request,
                       top_k: int | None = Query(None, ge=1, description="Classes per answer (default: the "
                                                                         "server's --top-k).")) -> JSONResponse:
        with self._work():
            async with self._deadline():
                t0 = time.perf_counter()
                info = await self._model_info()
                uploads = await self._uploads(request)
                if len(uploads) > self.options.max_files:
                    raise RequestError(400, f"{len(uploads)} files in one request; the limit is "
                                            f"{self.options.max_files}")
                decoded = await self._decode(uploads, info["resolution"])
                k = top_k or self.options.top_k
                outs = await self._classify_all([array for array, _ in decoded], k)
                total_ms = 1e3 * (time.perf_counter() - t0)
                answers = []
                for (name, _), (_, decode_ms), out in zip(uploads, decoded, outs, strict=True):
                    obj = dict(out["result"])
                    obj["image"] = name
                    obj["latency_ms"] = round(obj["latency_ms"] + decode_ms, 3)
                    obj["server"] = {"queue_ms": out["queue_ms"], "batch_size": out["batch_size"],
                                     "decode_ms": round(decode_ms, 3), "inference_ms": out["inference_ms"],
                                     "total_ms": round(total_ms, 3), "replica": out["replica"]}
                    answers.append(obj)
                return JSONResponse(answers)

    @api.get("/metrics", response_class=PlainTextResponse,
             summary="Prometheus metrics of this node: Ray Serve's and noop-rt's (all=true: every Ray metric).")
    async def prometheus(self, everything: bool = Query(False, alias="all")) -> PlainTextResponse:
        if self.metrics_url is None:
            self.metrics_url = await asyncio.to_thread(_node_metrics_url)
        if self.metrics_url is None:
            raise RequestError(503, "this Ray node exports no metrics (no metrics export port)")
        try:
            text = await asyncio.to_thread(_fetch, self.metrics_url)
        except OSError as exc:
            raise RequestError(503, f"cannot read Ray's metrics exporter at {self.metrics_url}: {exc}") from None
        return PlainTextResponse(text if everything else _families(text, METRIC_PREFIXES),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------------------------ KServe v2
    @api.get("/v2", summary="KServe v2: server metadata.")
    async def v2_server(self) -> dict[str, Any]:
        return kserve.server_metadata(__version__)

    @api.get("/v2/health/live", summary="KServe v2: liveness.")
    async def v2_live(self) -> dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready", summary="KServe v2: readiness (as /readyz).")
    async def v2_ready(self) -> JSONResponse:
        reason = await self._not_ready()
        return JSONResponse({"ready": reason is None}, status_code=200 if reason is None else 503)

    async def _kserve_model(self, name: str, version: str | None) -> dict[str, Any]:
        info = await self._model_info()
        if name != info["name"] or version not in (None, kserve.VERSION):
            wanted = name if version is None else f"{name} version {version}"
            raise RequestError(404, f"unknown model {wanted!r}: this server has {info['name']!r} version "
                                    f"{kserve.VERSION}")
        return info

    @api.get("/v2/models/{name}", summary="KServe v2: model metadata.")
    @api.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def v2_model(self, name: str, version: str | None = None) -> dict[str, Any]:
        info = await self._kserve_model(name, version)
        return kserve.model_metadata(info["name"], info["resolution"], info["classes"])

    @api.get("/v2/models/{name}/ready", summary="KServe v2: model readiness.")
    @api.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def v2_model_ready(self, name: str, version: str | None = None) -> JSONResponse:
        await self._kserve_model(name, version)
        reason = await self._not_ready()
        return JSONResponse({"name": name, "ready": reason is None}, status_code=200 if reason is None else 503)

    @api.post("/v2/models/{name}/infer", summary="KServe v2 inference (binary tensor data extension accepted).")
    @api.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        with self._work():
            async with self._deadline():
                info = await self._kserve_model(name, version)
                body = await self._body(request)
                req = kserve.parse_infer_request(body, request.headers.get(kserve.HEADER))
                resolution = info["resolution"]
                if req.input.name == kserve.INPUT_BYTES:
                    elements = cast(list[bytes], req.input.data)
                    if len(elements) > self.options.max_files:
                        raise RequestError(400, f"{len(elements)} images in one request; the limit is "
                                                f"{self.options.max_files}")
                    named = [(f"images[{i}]", e) for i, e in enumerate(elements)]
                    arrays = [a for a, _ in await self._decode(named, resolution)]
                else:
                    arrays = list(check_float_images(cast(np.ndarray, req.input.data), resolution,
                                                     self.options.max_files))
                outs = await self._classify_all(arrays, len(info["classes"]))
                probs = np.stack([o["probs"] for o in outs]).astype(np.float32)
                content, headers = kserve.infer_response(info["name"], req, probs, [o["label"] for o in outs],
                                                         info["classes"])
                return Response(content, headers=headers)


def build_app(load: LoadOptions, options: ServeOptions, *, model_cpus: float, ingress_cpus: float,
              threads: int | None) -> Any:
    """The application: the ingress bound to `options.replicas` model replicas."""
    model = ModelReplica.options(
        num_replicas=options.replicas,
        # requests queue in the replica (held while a batch runs, then batched together), not in Serve's router,
        # whose retries with backoff when replicas are at capacity collapsed throughput at concurrency 64
        max_ongoing_requests=max(16 * options.max_batch_size
                                 * (options.concurrent_batches or ONNXRUNTIME_CONCURRENT_BATCHES), 128),
        ray_actor_options={"num_cpus": model_cpus, "num_gpus": options.gpus_per_replica},
    ).bind(load, options, threads)
    return Ingress.options(
        num_replicas=1,
        max_ongoing_requests=max(1024, 8 * options.max_batch_size * options.replicas),
        ray_actor_options={"num_cpus": ingress_cpus},
    ).bind(model, options)
