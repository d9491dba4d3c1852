"""API keys: `Authorization: Bearer KEY` on every route but the probes and the page itself.

Keys come from `--api-key KEY` (repeatable), `--api-key-file FILE` (one key per line, `#` comments) and
`NOOP_RT_API_KEY` (comma-separated). Only their SHA-256 digests travel to the server's replicas (ServeOptions, the
ingress process's environment); a presented key's digest is compared in constant time with every configured one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from noop_rt.runtime.errors import BadInputError

KEY_ENV = "NOOP_RT_API_KEY"
DIGESTS_ENV = "NOOP_RT_API_KEY_SHA256"  # set in the ingress replica's own process, read by the check
# the probes a load balancer or orchestrator asks without credentials, and the page (a static file that asks for the
# key itself and sends it with every request)
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="noop-rt"'}
MIN_KEY_LENGTH = 16


def read_keys(keys: Iterable[str] = (), key_file: Path | None = None, env: str | None = None) -> tuple[str, ...]:
    """Every configured key, each checked: no whitespace inside, at least MIN_KEY_LENGTH characters."""
    found = [k.strip() for k in keys]
    if key_file is not None:
        try:
            lines = Path(key_file).expanduser().read_text().splitlines()
        except OSError as exc:
            raise BadInputError(f"cannot read --api-key-file {key_file}: {exc.strerror or exc}") from None
        found += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    value = os.environ.get(KEY_ENV, "") if env is None else env
    found += [k.strip() for k in value.split(",") if k.strip()]
    for key in found:
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise BadInputError(f"an API key must be at least {MIN_KEY_LENGTH} characters without spaces (one of "
                                f"--api-key, --api-key-file or {KEY_ENV} is not)")
    return tuple(dict.fromkeys(found))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authorized(header: str | None, digests: Iterable[str]) -> bool:
    """Whether an Authorization header carries a key whose digest is one of `digests`; every digest is compared,
    in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    presented = key_digest(given.strip()).encode()
    ok = False
    for digest in digests:
        ok |= hmac.compare_digest(presented, digest.encode())
    return ok


def is_loopback(host: str) -> bool:
    """Whether `--host` listens on loopback only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
