"""Browsers: which Host a request may name, and which other web origins may call the server.

- Host (`--allowed-hosts`): a page on another site that re-points its own DNS name at 127.0.0.1 (DNS rebinding) can
  make the browser send requests to a loopback server as if they were same-origin; its Host header still names the
  other site. On a loopback interface only loopback names (and the bound host) are accepted by default; bound to a
  public interface, any Host is, unless `--allowed-hosts` says which. Others: 400.
- Origin: CORS is off unless `--cors-origin ORIGIN` names origins whose pages may call the API (a preflight from
  them is answered; their responses carry Access-Control-Allow-Origin). A browser request that changes state (POST,
  PUT, PATCH, DELETE) from any other origin is refused with 403 before it is read: a "simple" cross-origin POST (a
  form, or a fetch without a preflight) would otherwise reach the model, since the browser only hides the answer.
  Clients other than browsers send no Origin and are not concerned.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from noop_rt.runtime.errors import BadInputError
from noop_rt.serve.auth import is_loopback

ALLOWED_HOSTS_ENV = "NOOP_RT_ALLOWED_HOSTS"  # set in the ingress replica's process; "*": any
CORS_ORIGINS_ENV = "NOOP_RT_CORS_ORIGINS"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def default_allowed_hosts(bound: str) -> tuple[str, ...]:
    """Loopback names and the bound host on a loopback interface; any host ("*") on another."""
    if not is_loopback(bound):
        return ("*",)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, bound.lower().strip("[]"))))


def check_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """`--cors-origin` values as scheme://host[:port], each checked (one line per bad one)."""
    found = []
    for origin in origins:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise BadInputError(f"--cors-origin {origin!r}: an origin is scheme://host[:port], e.g. "
                                "https://app.example.org")
        found.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(found)


def host_name(host_header: str | None) -> str:
    """The name in a Host header, without its port (IPv6 literals without brackets), lower case."""
    value = (host_header or "").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(host_header: str | None, allowed: Iterable[str]) -> bool:
    allowed = tuple(allowed)
    if "*" in allowed:
        return True
    name = host_name(host_header)
    return bool(name) and any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def cross_origin(origin: str | None, host_header: str | None, scheme: str, fetch_site: str | None) -> bool:
    """Whether a browser says this request comes from a page of another origin than this server's."""
    if fetch_site is not None and fetch_site.lower() in ("cross-site", "same-site"):
        return True
    if not origin:
        return False
    if origin == "null":  # a sandboxed frame, a file: page, some redirects
        return True
    return origin.lower() != f"{scheme}://{(host_header or '').lower()}"


def cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


PREFLIGHT_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                     "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding, "
                                                     "Inference-Header-Content-Length",
                     "Access-Control-Max-Age": "600"}
