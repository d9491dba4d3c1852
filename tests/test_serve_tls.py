"""`noop-rt serve` under TLS and its HTTP limits, on one real server (loopback, the demo bundle): a certificate made
here, checked by a Python client and by tritonclient; slow headers, oversized headers, too many header fields and a
client that leaves mid-body, each answered as the limits say (never a 500)."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from noop_rt.runtime.errors import BadInputError
from noop_rt.serve.options import tls_files

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("ray", "fastapi", "multipart", "httpx"))
HAVE_TRITON = importlib.util.find_spec("tritonclient") is not None
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="Ray Serve is not installed (pip install -e '.[serve]')")


APP_ORIGIN = "https://app.example.org"


def make_certificate(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1, and its key (PEM files in `folder`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_files_must_load_as_a_pair(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    assert tls_files(cert, key) == (str(cert.resolve()), str(key.resolve()))
    assert tls_files(None, None) == (None, None)
    with pytest.raises(BadInputError, match="go together"):
        tls_files(cert, None)
    with pytest.raises(BadInputError, match="cannot read the TLS certificate"):
        tls_files(tmp_path / "missing.pem", key)
    other = tmp_path / "other"
    other.mkdir()
    other_cert, _ = make_certificate(other)
    with pytest.raises(BadInputError, match="not a PEM certificate and its unencrypted private key"):
        tls_files(other_cert, key)  # a key that is not the certificate's


@needs_serve
def test_tls_and_keep_alive_reach_ray_serves_http_options(tmp_path: Path) -> None:
    from ray.serve.config import HTTPOptions

    from noop_rt.serve.options import ServeOptions
    from noop_rt.serve.server import http_options

    cert, key = tls_files(*make_certificate(tmp_path))
    found = HTTPOptions(**http_options(ServeOptions(keep_alive_s=7, ssl_certfile=cert, ssl_keyfile=key),
                                       "127.0.0.1", 8443))
    assert (found.host, found.port, found.keep_alive_timeout_s) == ("127.0.0.1", 8443, 7)
    assert (found.ssl_certfile, found.ssl_keyfile) == (cert, key)
    assert HTTPOptions(**http_options(ServeOptions(), "::1", 80)).ssl_certfile is None


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not HAVE_SERVE:
        pytest.skip("Ray Serve is not installed (pip install -e '.[serve]')")
    from noop_rt.serve.launch import ServerProcess

    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    args = ["--host", "0.0.0.0", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--header-timeout-s", "1",
            "--body-timeout-s", "2", "--max-header-kb", "8", "--max-headers", "20", "--cors-origin", APP_ORIGIN]
    with ServerProcess(args) as server:
        server.cert = str(cert)
        yield server


def _tls_socket(server: Any) -> ssl.SSLSocket:
    m = re.match(r"https://([\d.]+):(\d+)", server.url)
    assert m, server.url
    context = ssl.create_default_context(cafile=server.cert)
    raw = socket.create_connection((m.group(1), int(m.group(2))), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ssl.SSLError, ConnectionResetError):  # the server closed without a TLS close_notify
        pass
    return out


@needs_serve
def test_https_with_the_tests_own_certificate(tls_server: Any) -> None:
    import httpx

    from noop_rt.demo import EXAMPLES_DIR

    assert tls_server.url.startswith("https://127.0.0.1:")
    r = httpx.post(tls_server.url + "/v1/classify", content=(EXAMPLES_DIR / "seven.png").read_bytes(),
                   verify=ssl.create_default_context(cafile=tls_server.cert), timeout=60)
    assert r.status_code == 200 and r.json()[0]["label"] == "seven"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # not a certificate the system trusts
        httpx.get(tls_server.url + "/healthz", timeout=30)
    plain = tls_server.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
        httpx.get(plain + "/healthz", timeout=30)


@needs_serve
def test_on_all_interfaces_only_the_http_ports_are_public(tls_server: Any) -> None:
    """--host 0.0.0.0 asks for the HTTP port on every interface: the ingress replica's (the URL's) and Ray Serve's
    own proxy's (Serve binds it to the same host); the rest of the local Ray cluster stays on loopback."""
    from noop_rt.serve.launch import public_sockets

    sockets = tls_server.listening()
    assert "gcs_server" in " ".join(name for _, _, name in sockets), sockets
    public = public_sockets(sockets)
    port = int(tls_server.url.rsplit(":", 1)[1])
    assert port in {p for _, p, _ in public}
    assert all(p == port or "ProxyActor" in name for _, p, name in public), public
    assert any("without an API key" in line for line in tls_server.stderr)


@needs_serve
@pytest.mark.skipif(not HAVE_TRITON, reason="tritonclient is not installed (pip install 'tritonclient[http]')")
def test_tritonclient_over_tls(tls_server: Any) -> None:
    import numpy as np
    import tritonclient.http as th

    from noop_rt.demo import EXAMPLES_DIR

    url = tls_server.url.removeprefix("https://")
    client = th.InferenceServerClient(url, ssl=True, ssl_options={"ca_certs": tls_server.cert},
                                      connection_timeout=60, network_timeout=120)
    assert client.is_server_ready()
    images = th.InferInput("images", [1], "BYTES")
    images.set_data_from_numpy(np.array([(EXAMPLES_DIR / "seven.png").read_bytes()], dtype=object))
    result = client.infer("digits", [images])
    assert [x.decode() for x in result.as_numpy("labels")] == ["seven"]


@needs_serve
def test_slow_headers_are_cut_off_by_the_real_server(tls_server: Any) -> None:
    with _tls_socket(tls_server) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(8):
            time.sleep(0.25)
            try:
                s.sendall(b"X")
            except OSError:
                break
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 5.0


@needs_serve
def test_oversized_headers_and_too_many_fields_are_431(tls_server: Any) -> None:
    import httpx

    verify = ssl.create_default_context(cafile=tls_server.cert)
    with _tls_socket(tls_server) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
        try:
            for _ in range(64):  # up to 4 MB of one header, never finished
                s.sendall(b"a" * 65536)
        except OSError:
            pass
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    many = {f"x-field-{i}": "1" for i in range(25)}
    r = httpx.get(tls_server.url + "/healthz", headers=many, verify=verify, timeout=30)
    assert r.status_code == 431 and "--max-headers" in r.json()["error"]
    assert httpx.get(tls_server.url + "/healthz", verify=verify, timeout=30).status_code == 200


@needs_serve
def test_a_client_leaving_mid_body_is_counted_499_never_500(tls_server: Any) -> None:
    import httpx

    verify = ssl.create_default_context(cafile=tls_server.cert)
    for _ in range(3):
        with _tls_socket(tls_server) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" + b"a" * 2000)
            time.sleep(0.3)
    deadline = time.monotonic() + 90  # Ray's exporter publishes every few seconds
    lines: list[str] = []
    while time.monotonic() < deadline:
        text = httpx.get(tls_server.url + "/metrics", verify=verify, timeout=30).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_serve_num_http_requests_total")
                 and "/v1/classify" in ln]
        if any('"499"' in ln for ln in lines):
            break
        time.sleep(2)
    assert any('"499"' in ln for ln in lines), lines
    assert not any('"500"' in ln for ln in lines), lines


@needs_serve
def test_a_cors_origin_gets_its_preflight_and_its_header(tls_server: Any) -> None:
    import httpx

    from noop_rt.demo import EXAMPLES_DIR

    verify = ssl.create_default_context(cafile=tls_server.cert)
    with httpx.Client(verify=verify, timeout=60) as client:
        preflight = client.options(tls_server.url + "/v1/classify", headers={
            "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        r = client.post(tls_server.url + "/v1/classify", content=(EXAMPLES_DIR / "seven.png").read_bytes(),
                        headers={"Origin": APP_ORIGIN, "Content-Type": "image/png"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
        other = client.post(tls_server.url + "/v1/classify", content=b"x",
                            headers={"Origin": "https://other.example.org"})
        assert other.status_code == 403
