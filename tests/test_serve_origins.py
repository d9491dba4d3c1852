"""Which Host names and web origins `noop-rt serve` accepts (serve.origins); the real server's answers are checked in
test_serve.py and test_serve_tls.py."""

from __future__ import annotations

import pytest

from noop_rt.runtime.errors import BadInputError
from noop_rt.serve.origins import check_origins, cross_origin, default_allowed_hosts, host_allowed, host_name


def test_default_hosts_are_loopback_names_on_loopback_and_any_elsewhere() -> None:
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert "127.0.0.2" in default_allowed_hosts("127.0.0.2")
    assert default_allowed_hosts("0.0.0.0") == ("*",) and default_allowed_hosts("10.1.2.3") == ("*",)


def test_host_header_names() -> None:
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("[::1]:8000") == "::1" and host_name("::1") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1" and host_name(None) == ""
    loopback = default_allowed_hosts("127.0.0.1")
    assert host_allowed("127.0.0.1:8000", loopback) and host_allowed("[::1]:8000", loopback)
    assert host_allowed("localhost", loopback)
    for rebound in ("attacker.example:8000", "localhost.attacker.example", "", None, "127.0.0.1.nip.io"):
        assert not host_allowed(rebound, loopback), rebound
    assert host_allowed("api.example.org:443", ["*.example.org"]) and not host_allowed("example.com", ["*.example.org"])
    assert host_allowed("anything", ["*"])


def test_cross_origin_is_what_the_browser_says() -> None:
    assert not cross_origin(None, "127.0.0.1:8000", "http", None)  # curl, tritonclient: no Origin
    assert not cross_origin("http://127.0.0.1:8000", "127.0.0.1:8000", "http", "same-origin")  # the page itself
    assert cross_origin("http://127.0.0.1:8000", "127.0.0.1:8000", "https", None)  # scheme differs
    assert cross_origin("https://attacker.example", "127.0.0.1:8000", "http", None)
    assert cross_origin("null", "127.0.0.1:8000", "http", None)
    assert cross_origin(None, "127.0.0.1:8000", "http", "cross-site")  # a form post whose Origin was dropped


def test_cors_origins_are_checked() -> None:
    assert check_origins(["https://App.example.org", "http://localhost:3000/"]) == (
        "https://app.example.org", "http://localhost:3000")
    for bad in ("app.example.org", "https://app.example.org/path", "ftp://x", "*"):
        with pytest.raises(BadInputError, match="--cors-origin"):
            check_origins([bad])
