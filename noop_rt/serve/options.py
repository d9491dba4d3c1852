"""How to serve: the server's settings, checked when made (one line per bad value)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from noop_rt.runtime.errors import BadInputError

APP_NAME = "noop-rt"  # the Ray Serve application's name


def default_max_pixels(resolution: int) -> int:
    """The per-image pixel limit that follows the model: 64 x R^2, and at least 16 M pixels (512 px: 16.8 M, 1024 px:
    67 M). Decoding holds a few bytes per pixel, so this bounds one image's memory."""
    return max(16_000_000, 64 * resolution * resolution)


@dataclass(frozen=True)
class ServeOptions:
    """How to serve. `max_upload_mb` 0 means no limit on the request body (images are still refused over
    `max_pixels` before they are decoded)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the printed URL says which)
    replicas: int = 1  # model replicas, one classifier each
    gpus_per_replica: float = 0.0
    threads: int | None = None  # engine threads per replica (None: see server.replica_resources)
    max_batch_size: int = 8  # images gathered into one B*C UNet batch
    concurrent_batches: int | None = None  # batches a replica runs at once (None: app.concurrent_batches)
    batch_wait_ms: float = 2.0  # longest wait for a batch to fill (requests that arrive while all of a replica's
    # concurrent batches run are held and batched anyway: the wait only matters when one can start at once)
    max_upload_mb: float = 10.0  # largest request body
    ray_address: str | None = None  # an existing cluster (else RAY_ADDRESS, else a local one)
    top_k: int = 5  # classes per answer unless the request asks (?top_k=)
    max_pixels: int | None = None  # larger images are refused from their header, never decoded (None: by the
    # model's resolution, default_max_pixels)
    max_request_pixels: int | None = None  # pixels one request may decode in all (None: 4 x the per-image limit)
    max_files: int = 256  # images per request
    request_timeout_s: float = 60.0  # a classify/infer request still running after this answers 504, its work dropped
    drain_timeout_s: float = 30.0  # longest wait for in-flight requests after SIGTERM/SIGINT
    drain_quiet_s: float = 1.0  # drained once no request has been in flight for this long
    ssl_certfile: str | None = None  # TLS: the certificate chain (PEM), with ssl_keyfile; absolute paths (the
    ssl_keyfile: str | None = None  # ingress replica's working directory is not the caller's)
    keep_alive_s: int = 5  # an idle kept-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request line and headers must arrive in full within this (slow clients cut off)
    body_timeout_s: float = 30.0  # longest pause between two pieces of a request body
    max_header_bytes: int = 32 * 1024  # request line and headers, in all (431 beyond)
    max_headers: int = 100  # header fields per request (431 beyond)
    max_connections: int = 1000  # open connections to the ingress; more are answered 503 and closed
    allowed_hosts: tuple[str, ...] = ()  # Host header names served (empty: origins.default_allowed_hosts; "*": any)
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API (CORS); none by default
    # SHA-256 digests of the Bearer keys every route but the probes requires (serve.auth.key_digest); no key is here
    api_key_digests: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        checks = [(self.replicas >= 1, "--replicas must be at least 1"),
                  (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
                  (self.concurrent_batches is None or self.concurrent_batches >= 1,
                   "--concurrent-batches must be at least 1"),
                  (self.batch_wait_ms >= 0, "--batch-wait-ms must not be negative"),
                  (self.max_upload_mb >= 0, "--max-upload-mb must not be negative"),
                  (self.gpus_per_replica >= 0, "--gpus-per-replica must not be negative"),
                  (self.threads is None or self.threads >= 1, "--threads must be at least 1"),
                  (0 <= self.port <= 65535, "--port must be 0..65535"),
                  (self.top_k >= 1, "--top-k must be at least 1"),
                  (self.request_timeout_s > 0, "--request-timeout-s must be positive"),
                  ((self.ssl_certfile is None) == (self.ssl_keyfile is None),
                   "--ssl-certfile and --ssl-keyfile go together"),
                  (self.keep_alive_s >= 1 and self.header_timeout_s > 0 and self.body_timeout_s > 0,
                   "--keep-alive-s, --header-timeout-s and --body-timeout-s must be positive"),
                  (self.max_header_bytes >= 1024 and self.max_headers >= 8 and self.max_connections >= 1,
                   "--max-header-kb must be at least 1, --max-headers at least 8, --max-connections at least 1"),
                  ((self.max_pixels or 1) >= 1 and self.max_files >= 1 and (self.max_request_pixels or 1) >= 1,
                   "--max-pixels, max_request_pixels and max_files must be positive")]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)

    def pixel_limits(self, resolution: int) -> tuple[int, int]:
        """(pixels one image may have, pixels one request may decode in all) for a model of `resolution`."""
        per_image = self.max_pixels or default_max_pixels(resolution)
        return per_image, self.max_request_pixels or 4 * per_image

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def max_upload_bytes(self) -> int | None:
        return int(self.max_upload_mb * 1024 * 1024) if self.max_upload_mb > 0 else None


def tls_files(certfile: str | Path | None, keyfile: str | Path | None) -> tuple[str | None, str | None]:
    """(certificate, key) as absolute paths once they are known to load as a pair (a wrong file is one line now,
    not a replica that fails to start); (None, None) without TLS."""
    if certfile is None and keyfile is None:
        return None, None
    if certfile is None or keyfile is None:
        raise BadInputError("--ssl-certfile and --ssl-keyfile go together")
    cert, key = (str(Path(p).expanduser().resolve()) for p in (certfile, keyfile))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise BadInputError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a PEM certificate and its "
                            f"unencrypted private key ({exc.reason or exc})") from None
    except OSError as exc:
        raise BadInputError(f"cannot read the TLS certificate or key: {exc.strerror or exc} "
                            f"({getattr(exc, 'filename', None) or cert})") from None
    return cert, key
