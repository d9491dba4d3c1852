"""API keys for `noop-rt serve`: reading them, checking a header, and a real server that asks for one."""

from __future__ import annotations

import importlib.util

import pytest

from noop_rt.runtime.errors import BadInputError
from noop_rt.serve.auth import OPEN_PATHS, authorized, is_loopback, key_digest, read_keys
from noop_rt.serve.options import ServeOptions

KEY = "k3y-0123456789abcdef"
OTHER = "0th3r-0123456789abcdef"


def test_keys_come_from_flags_a_file_and_the_environment(tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# serving keys\n{OTHER}\n\n")
    assert read_keys([KEY], keys, env=f" {KEY} , third-key-0123456789") == (KEY, OTHER, "third-key-0123456789")
    assert read_keys([], None, env="") == ()
    with pytest.raises(BadInputError, match="at least 16 characters"):
        read_keys(["short"], None, env="")
    with pytest.raises(BadInputError, match="cannot read --api-key-file"):
        read_keys([], tmp_path / "missing.txt", env="")
    digest = key_digest(KEY)
    assert len(digest) == 64 and KEY not in digest and digest not in repr(ServeOptions(api_key_digests=(digest,)))


def test_only_a_bearer_header_with_a_configured_key_passes() -> None:
    digests = [key_digest(OTHER), key_digest(KEY)]
    assert authorized(f"Bearer {KEY}", digests) and authorized(f"bearer {KEY}", digests[1:])
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer ", f"Bearer {OTHER}"):
        assert not authorized(header, digests[1:]), header
    assert {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"} <= OPEN_PATHS
    assert "/v1/classify" not in OPEN_PATHS and "/metrics" not in OPEN_PATHS and "/docs" not in OPEN_PATHS


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.org"))


HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("ray", "fastapi", "multipart", "httpx"))


@pytest.mark.skipif(not HAVE_SERVE, reason="Ray Serve is not installed (pip install -e '.[serve]'); CI installs it")
def test_a_server_with_a_key_refuses_requests_without_it() -> None:
    import httpx

    from noop_rt.demo import EXAMPLES_DIR
    from noop_rt.serve.launch import ServerProcess

    image = (EXAMPLES_DIR / "seven.png").read_bytes()
    with ServerProcess(["--api-key", KEY]) as server:
        for headers in ({}, {"Authorization": f"Bearer {OTHER}"}):
            r = httpx.post(server.url + "/v1/classify", content=image, headers=headers, timeout=60)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["x-content-type-options"] == "nosniff"
            assert "API key" in r.json()["error"]
        for path in ("/v1/model", "/metrics", "/docs", "/v2/models/digits"):
            assert httpx.get(server.url + path, timeout=60).status_code == 401, path
        r = httpx.post(server.url + "/v1/classify", content=image, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=60)
        assert r.status_code == 200 and r.json()[0]["label"] == "seven"
        for path in ("/healthz", "/readyz", "/v2/health/live", "/"):  # probes and the page need no key
            assert httpx.get(server.url + path, timeout=60).status_code == 200, path
        import tritonclient.http as triton

        client = triton.InferenceServerClient(server.url.split("://", 1)[1])
        headers = {"Authorization": f"Bearer {KEY}"}
        assert client.is_model_ready("digits", headers=headers)
        with pytest.raises(Exception, match=r"401|API key"):
            client.get_model_metadata("digits")


def test_serve_passes_digests_and_warns_off_loopback_without_a_key(monkeypatch) -> None:
    """The CLI hands the server the keys' digests, never the keys, and says so when a public --host has none."""
    from typer.testing import CliRunner

    import noop_rt.serve
    from noop_rt.cli import app

    seen: list[ServeOptions] = []
    monkeypatch.setattr(noop_rt.serve, "run_server", lambda load, options: seen.append(options))
    monkeypatch.delenv("NOOP_RT_API_KEY", raising=False)
    res = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert res.exit_code == 0 and "warning: serving on 0.0.0.0 without an API key" in res.stderr
    assert seen[-1].api_key_digests == ()
    res = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--api-key", KEY])
    assert res.exit_code == 0 and "warning" not in res.stderr
    assert seen[-1].api_key_digests == (key_digest(KEY),)
    monkeypatch.setenv("NOOP_RT_API_KEY", OTHER)
    CliRunner().invoke(app, ["serve"])
    assert seen[-1].api_key_digests == (key_digest(OTHER),)


@pytest.mark.skipif(not HAVE_SERVE, reason="Ray Serve is not installed (pip install -e '.[serve]'); CI installs it")
def test_a_request_past_its_deadline_is_a_504_and_the_server_stays_up() -> None:
    """--request-timeout-s far below one inference: classify and KServe infer answer 504 with a JSON error; the
    probes still answer."""
    import httpx

    from noop_rt.demo import EXAMPLES_DIR
    from noop_rt.serve.launch import ServerProcess

    image = (EXAMPLES_DIR / "seven.png").read_bytes()
    with ServerProcess(["--request-timeout-s", "0.001"]) as server:
        r = httpx.post(server.url + "/v1/classify", content=image, timeout=60)
        assert r.status_code == 504 and "--request-timeout-s" in r.json()["error"]
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]}
        r = httpx.post(server.url + "/v2/models/digits/infer", json=body, timeout=60)
        assert r.status_code == 504
        assert httpx.get(server.url + "/healthz", timeout=60).status_code == 200
