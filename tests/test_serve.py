"""`noop-rt serve` on the shipped demo: the request checks and the KServe v2 codec on their own, then ONE real server
(`python -m noop_rt serve`, Ray Serve on a local cluster, 2 model replicas) for the module: start, ready, classify,
concurrent requests without cross-talk, bad input, tritonclient, metrics, a replica killed mid-load, SIGTERM.

Truths: each demo example is named after its class (`seven.png` is a seven), and `noop_rt.load()` in this process
(what `noop-rt classify` runs) gives the reference probabilities. The server tests run in file order: the last one
stops the server."""

from __future__ import annotations

import asyncio
import base64
import gzip
import importlib.util
import json
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from noop_rt.api import LoadOptions
from noop_rt.demo import EXAMPLES_DIR
from noop_rt.runtime.errors import BadInputError, MissingDependencyError
from noop_rt.runtime.extras import install_hint
from noop_rt.runtime.images import load_image
from noop_rt.serve import ServeOptions, kserve
from noop_rt.serve.uploads import RequestError, decode_image, inflate, read_body

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("ray", "fastapi", "multipart", "httpx")) and \
    importlib.util.find_spec("ray.serve") is not None and importlib.util.find_spec("starlette") is not None
HAVE_TRITON = importlib.util.find_spec("tritonclient") is not None
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="Ray Serve is not installed (pip install 'noop-rt[serve]'); "
                                                        "CI installs it")
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.png"))
UPLOAD_MB = 1  # the module server's --max-upload-mb: over-limit bodies stay small
MODEL_PREFIX = "SERVE_REPLICA::noop-rt#Model#"


# ---------------------------------------------------------------------------------------------- test inputs
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 40000, rows: int | None = None) -> bytes:
    """A 1-bit side x side PNG of zeros. Complete (rows=None) it is ~195 KB that decodes to 1.6 G pixels (4.8 GB as
    RGB); with `rows` it holds only that many rows of data: a few KB, the same header."""
    row = b"\x00" * (1 + (side + 7) // 8)
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(side if rows is None else rows)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """In-process `noop_rt.load()` answers for each example: {stem: {"label", "probs": {class: prob}}}."""
    import noop_rt

    clf = noop_rt.load()
    results = clf.classify([str(p) for p in EXAMPLES], top_k=len(clf.classes))
    clf.close()
    return {Path(str(r.image)).stem: {"label": r.label, "probs": {t.label: t.prob for t in r.top}} for r in results}


# ---------------------------------------------------------------------------------------------- no server needed
def test_serve_package_imports_without_ray() -> None:
    code = "import sys, noop_rt.serve, noop_rt.serve.uploads, noop_rt.serve.kserve; " \
           "sys.exit('ray imported' if 'ray' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from noop_rt.serve import run_server

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MissingDependencyError) as missing:
        run_server(LoadOptions(), ServeOptions())
    assert install_hint("serve") in str(missing.value) and "[serve]" in install_hint("serve")


def test_options_are_checked() -> None:
    with pytest.raises(BadInputError, match="--replicas"):
        ServeOptions(replicas=0)
    with pytest.raises(BadInputError, match="--max-batch-size"):
        ServeOptions(max_batch_size=0)
    assert ServeOptions(max_upload_mb=0).max_upload_bytes is None
    assert ServeOptions(max_upload_mb=2).max_upload_bytes == 2 * 1024 * 1024
    with pytest.raises(BadInputError, match="--threads"):
        ServeOptions(threads=0)


def test_replica_threads_follow_the_replicas_and_the_cluster() -> None:
    from noop_rt.serve.server import replica_resources

    # one local replica: a thread per core, given (so onnxruntime's do not spin); several: the cores but one split,
    # at least one thread each
    assert replica_resources(ServeOptions(), 2.0, local=True) == (1.75, 2)
    assert replica_resources(ServeOptions(), 16.0, local=True) == (15.75, 16)
    assert replica_resources(ServeOptions(concurrent_batches=1), 2.0, local=True) == (1.75, None)  # engine default
    assert replica_resources(ServeOptions(replicas=2), 4.0, local=True) == (1.87, 1)
    assert replica_resources(ServeOptions(replicas=2), 9.0, local=True) == (4.37, 4)
    assert replica_resources(ServeOptions(replicas=3), 2.0, local=True)[1] == 1
    # --threads wins, locally and on a cluster (where a replica reserves one CPU)
    assert replica_resources(ServeOptions(threads=3), 2.0, local=True) == (1.75, 3)
    assert replica_resources(ServeOptions(threads=3), 64.0, local=False) == (1.0, 3)
    assert replica_resources(ServeOptions(), 64.0, local=False) == (1.0, None)
    with pytest.raises(BadInputError, match="do not fit"):
        replica_resources(ServeOptions(replicas=200), 2.0, local=True)


@needs_serve
def test_concurrent_batches_only_where_the_engine_runs_calls_at_once() -> None:
    from noop_rt.serve.app import concurrent_batches

    assert concurrent_batches(ServeOptions(), "onnxruntime") == 2
    for backend in ("openvino", "tensorrt", "torch"):
        assert concurrent_batches(ServeOptions(), backend) == 1
    assert concurrent_batches(ServeOptions(concurrent_batches=3), "onnxruntime") == 3
    assert concurrent_batches(ServeOptions(concurrent_batches=1), "tensorrt") == 1
    with pytest.raises(BadInputError, match="needs the onnxruntime backend"):
        concurrent_batches(ServeOptions(concurrent_batches=2), "openvino")
    with pytest.raises(BadInputError, match="--concurrent-batches"):
        ServeOptions(concurrent_batches=0)


@needs_serve
def test_cli_refuses_a_missing_bundle_in_one_line(tmp_path: Path) -> None:
    from noop_rt.cli import app

    result = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path / "nope"), "--port", "0"])
    assert result.exit_code == 1
    assert "not found" in result.output and "Traceback" not in result.output


@needs_serve
def test_a_model_that_fails_to_open_in_the_replicas_is_one_line_exit_1(tmp_path: Path) -> None:
    """The replicas' own error (here a bundle of an unknown format version) reaches the user as one line."""
    import shutil

    from noop_rt.demo import BUNDLE_DIR

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    run = subprocess.run([sys.executable, "-m", "noop_rt", "serve", "--bundle", str(bundle), "--port", "0"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stdout == ""  # no URL: it never served
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "format 99" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_uploads_decode_like_the_cli() -> None:
    for path in EXAMPLES:
        np.testing.assert_array_equal(decode_image(path.read_bytes(), path.name, 16, 10_000), load_image(path, 16))


def test_a_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch, bomb: bytes) -> None:
    def no_pixels(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    monkeypatch.setattr(Image.Image, "load", no_pixels)
    for data in (bomb, bomb_png(rows=8)):
        with pytest.raises(RequestError) as info:
            decode_image(data, "bomb.png", 16, 50_000_000)
        assert info.value.status == 400
    with pytest.raises(RequestError, match="over the server's limit") as info:  # under Pillow's own guard, over ours
        decode_image(bomb_png(side=4000, rows=1), "big.png", 16, 1_000_000)
    assert info.value.status == 400


@pytest.mark.parametrize(("data", "status"), [
    (b"", 400),
    (b"hello, not an image", 415),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415),  # never handed to Ghostscript
    (EXAMPLES[0].read_bytes()[:80], 400),  # a PNG header, then nothing
])
def test_bad_bytes_get_their_status(data: bytes, status: int) -> None:
    with pytest.raises(RequestError) as info:
        decode_image(data, "x", 16, 50_000_000)
    assert info.value.status == status


def test_bodies_stop_at_the_limit() -> None:
    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield b"x" * 1000

    assert len(asyncio.run(read_body(chunks(3), 3000))) == 3000
    with pytest.raises(RequestError) as info:
        asyncio.run(read_body(chunks(4), 3000))
    assert info.value.status == 413
    payload = b"abc" * 1000
    assert inflate(gzip.compress(payload), "gzip", 10_000) == payload
    assert inflate(zlib.compress(payload), "deflate", 10_000) == payload
    for body, coding, status in ((gzip.compress(b"\0" * 2_000_000), "gzip", 413),
                                 (gzip.compress(payload)[:-12], "gzip", 400), (payload, "br", 415)):
        with pytest.raises(RequestError) as info:
            inflate(body, coding, 1_000_000)
        assert info.value.status == status


@pytest.mark.skipif(not HAVE_TRITON, reason="tritonclient is not installed (pip install 'tritonclient[http]')")
def test_kserve_codec_against_tritonclient() -> None:
    """Requests built and responses read by tritonclient's own (de)serializers."""
    import tritonclient.http as th

    images = np.array([p.read_bytes() for p in EXAMPLES[:3]], dtype=object)
    inp = th.InferInput("images", [3], "BYTES")
    inp.set_data_from_numpy(images, binary_data=True)
    outputs = [th.InferRequestedOutput("probs", binary_data=True), th.InferRequestedOutput("labels", binary_data=False)]
    body, json_size = th.InferenceServerClient.generate_request_body([inp], outputs=outputs, request_id="7")
    req = kserve.parse_infer_request(body, str(json_size))
    assert req.input.name == "images" and req.input.data == list(images) and req.id == "7"
    assert [(o.name, o.binary) for o in req.outputs] == [("probs", True), ("labels", False)]

    floats = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    inp = th.InferInput("image", [2, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(floats, binary_data=False)
    body, json_size = th.InferenceServerClient.generate_request_body([inp])
    req = kserve.parse_infer_request(body, None if json_size is None else str(json_size))
    np.testing.assert_array_equal(req.input.data, floats)
    assert all(o.binary for o in req.outputs)  # no outputs named: tritonclient asks for binary

    classes = ["a", "b", "c"]
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32)

    def read(outputs: list[kserve.RequestedOutput]) -> Any:
        req.outputs = outputs
        content, headers = kserve.infer_response("m", req, probs, ["b", "a"], classes)
        length = headers.get(kserve.HEADER)
        return th.InferenceServerClient.parse_response_body(content, header_length=None if length is None
                                                            else int(length))

    for binary in (False, True):
        result = read([kserve.RequestedOutput("probs", binary), kserve.RequestedOutput("labels", binary)])
        np.testing.assert_array_equal(result.as_numpy("probs"), probs)
        assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("labels")] == ["b", "a"]
        top = read([kserve.RequestedOutput("probs", binary, classification=2)]).as_numpy("probs")
        assert [[x.decode() if isinstance(x, bytes) else x for x in row] for row in top] == \
            [["0.500000:1:b", "0.300000:2:c"], ["0.600000:0:a", "0.300000:2:c"]]


@pytest.mark.parametrize(("doc", "binary", "header", "message"), [
    ({"inputs": []}, b"", None, "exactly one input"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1]}]}, b"", None, "must be BYTES"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, b"", None, "unknown input"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 7}}]},
     struct.pack("<I", 3) + b"abc", "auto", "holds 1 element"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, b"", None, "base64"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}, b"", None, "3 expected"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]},
     struct.pack("<I", 1) + b"a" + b"extra", "auto", "unclaimed"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
      "outputs": [{"name": "logits"}]}, b"", None, "unknown output"),
])
def test_kserve_bad_requests(doc: dict[str, Any], binary: bytes, header: str | None, message: str) -> None:
    head = json.dumps(doc).encode()
    with pytest.raises(RequestError, match=message) as info:
        kserve.parse_infer_request(head + binary, str(len(head)) if header == "auto" else header)
    assert info.value.status == 400


def test_kserve_base64_json_images() -> None:
    raw = EXAMPLES[0].read_bytes()
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(raw).decode()]}]}
    assert kserve.parse_infer_request(json.dumps(doc).encode(), None).input.data == [raw]


# ---------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server() -> Any:
    if not HAVE_SERVE:
        pytest.skip("Ray Serve is not installed (pip install 'noop-rt[serve]'); CI installs it")
    from noop_rt.serve.launch import ServerProcess

    proc = ServerProcess(["--replicas", "2", "--max-batch-size", "8", "--batch-wait-ms", "50", "--max-upload-mb",
                          str(UPLOAD_MB)])
    proc.start()
    yield proc
    proc.stop()
    proc.kill()


def post_image(client: Any, url: str, path: Path, **params: Any) -> Any:
    return client.post(f"{url}/v1/classify", content=path.read_bytes(), params=params,
                       headers={"Content-Type": "image/png"})


def assert_matches_reference(answer: dict[str, Any], stem: str, reference: dict[str, dict[str, Any]]) -> None:
    assert answer["top"][0]["class"] == stem  # the file name is the truth
    for entry in answer["top"]:
        assert entry["prob"] == pytest.approx(reference[stem]["probs"][entry["class"]], abs=1e-4)


@needs_serve
def test_start_ready_and_describe(server: Any) -> None:
    import httpx

    url = server.url
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    page = httpx.get(f"{url}/", timeout=30)  # the page may not be framed by another site, nor run foreign scripts
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{url}/v1/model", timeout=30).headers["x-content-type-options"] == "nosniff"
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    model = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert model["name"] == "digits"
    assert sorted(model["classes"]) == sorted(p.stem for p in EXAMPLES)
    assert model["method"] == "noop" and model["backend"] and model["version"]
    assert model["manifest"]["name"] == "digits" and model["manifest"]["format"] == "noop-rt.bundle"
    assert model["server"]["replicas"] == 2 and model["server"]["max_batch_size"] == 8
    assert httpx.get(f"{url}/docs", timeout=30).status_code == 200
    paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/classify", "/v1/model", "/healthz", "/readyz", "/v2/models/{name}/infer"} <= set(paths)
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "<script>" in page.text
    assert not any(ref in page.text for ref in ('src="http', 'href="http', 'src="//', 'href="//'))  # no CDN


def no_direct_ingress_in_ray() -> str | None:
    """Why this Ray has no throughput-optimized mode with direct ingress, or None when it has."""
    import ray

    from noop_rt.serve.server import ray_has_direct_ingress

    if ray_has_direct_ingress():
        return None
    return f"this Ray ({ray.__version__}) has no throughput-optimized mode; Serve's proxy serves the port"


def direct_ingress_expected() -> str | None:
    """Why the test server cannot be in Serve's direct-ingress mode here, or None when it must be."""
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1") != "1" or \
            os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1") != "1":
        return "the environment turns Serve's throughput-optimized mode or its direct ingress off"
    return no_direct_ingress_in_ray()


@needs_serve
def test_throughput_optimized_pins_the_port_and_respects_an_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from noop_rt.serve.server import DIRECT_INGRESS_SETTINGS, throughput_optimized

    why_not = no_direct_ingress_in_ray()
    if why_not is not None:
        pytest.skip(why_not)
    for name in DIRECT_INGRESS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000")  # a user's pool: replaced by the port
    monkeypatch.setenv("RAY_SERVE_PORT_QUARANTINE_S", "7")  # a user's own choice: kept
    assert throughput_optimized(8123) is True
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    pool = (os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert pool == ("8123", "8124")
    assert os.environ["RAY_SERVE_PORT_QUARANTINE_S"] == "7"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    for opt_out in ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}):
        for name in DIRECT_INGRESS_SETTINGS:
            monkeypatch.delenv(name, raising=False)
        for name, value in opt_out.items():
            monkeypatch.setenv(name, value)
        assert throughput_optimized(8123) is False
        assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in os.environ


@needs_serve
def test_the_ingress_replica_itself_listens_on_the_url(server: Any) -> None:
    """Serve's direct ingress on the local cluster: the ingress replica, not Serve's HTTP proxy, owns the port."""
    import psutil

    why_not = direct_ingress_expected()
    if why_not is not None:
        pytest.skip(why_not)

    port = int(server.url.rsplit(":", 1)[1])
    owners = {c.pid for c in psutil.net_connections("tcp")
              if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
    titles = [" ".join(psutil.Process(pid).cmdline()) for pid in owners]
    assert titles and all("ServeReplica:noop-rt:Ingress" in t for t in titles), titles


@needs_serve
def test_classify_raw_and_multipart(server: Any, reference: dict[str, dict[str, Any]]) -> None:
    import httpx

    with httpx.Client(timeout=60) as client:
        for path in EXAMPLES:
            r = post_image(client, server.url, path)
            assert r.status_code == 200, r.text
            (answer,) = r.json()
            assert {"image", "top", "method", "backend", "latency_ms", "unet_evals"} <= set(answer)
            assert len(answer["top"]) == 5 and {"class", "prob", "error"} == set(answer["top"][0])
            assert answer["server"]["batch_size"] >= 1 and answer["server"]["queue_ms"] >= 0
            assert_matches_reference(answer, path.stem, reference)
        three = EXAMPLES[:3]
        r = client.post(f"{server.url}/v1/classify", params={"top_k": 2},
                        files=[("files", (p.name, p.read_bytes(), "image/png")) for p in three])
        assert r.status_code == 200, r.text
        answers = r.json()
        assert [a["image"] for a in answers] == [p.name for p in three]
        for answer, path in zip(answers, three, strict=True):
            assert len(answer["top"]) == 2
            assert_matches_reference(answer, path.stem, reference)


@needs_serve
def test_concurrent_requests_get_their_own_answers(server: Any, reference: dict[str, dict[str, Any]]) -> None:
    """40 requests for different digits at once: batched together, each answer still belongs to its image."""
    import httpx

    order = EXAMPLES * 4
    random.Random(0).shuffle(order)

    async def run() -> list[Any]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return list(await asyncio.gather(*(post_image(client, server.url, p) for p in order)))

    responses = asyncio.run(run())
    sizes = []
    for path, r in zip(order, responses, strict=True):
        assert r.status_code == 200, r.text
        (answer,) = r.json()
        assert_matches_reference(answer, path.stem, reference)
        sizes.append(answer["server"]["batch_size"])
    assert max(sizes) > 1, f"no two requests were batched together: {sizes}"


@needs_serve
def test_bad_inputs_get_4xx_json(server: Any, bomb: bytes) -> None:
    import httpx

    url = server.url
    too_big = b"\0" * (UPLOAD_MB * 1024 * 1024 + 1)

    def chunked() -> Any:
        for _ in range(UPLOAD_MB + 1):
            yield b"\0" * (1024 * 1024)

    cases = [
        ("non-image body", dict(method="POST", url=f"{url}/v1/classify", content=b"plain text, no image"), 415),
        ("non-image file", dict(method="POST", url=f"{url}/v1/classify",
                                files=[("f", ("notes.txt", b"not an image", "text/plain"))]), 415),
        ("over the limit", dict(method="POST", url=f"{url}/v1/classify", content=too_big), 413),
        ("over the limit, chunked", dict(method="POST", url=f"{url}/v1/classify", content=chunked()), 413),
        ("bomb", dict(method="POST", url=f"{url}/v1/classify", content=bomb), 400),
        ("bomb, few KB", dict(method="POST", url=f"{url}/v1/classify", content=bomb_png(rows=8)), 400),
        ("empty body", dict(method="POST", url=f"{url}/v1/classify", content=b""), 400),
        ("form without a file", dict(method="POST", url=f"{url}/v1/classify", headers={
            "Content-Type": "multipart/form-data; boundary=XyZ"},
            content=b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--XyZ--\r\n'), 400),
        ("broken form", dict(method="POST", url=f"{url}/v1/classify", headers={
            "Content-Type": "multipart/form-data; boundary=XyZ"}, content=b"--XyZ\r\nno end"), 400),
        ("top_k 0", dict(method="POST", url=f"{url}/v1/classify?top_k=0", content=EXAMPLES[0].read_bytes()), 400),
        ("wrong method", dict(method="GET", url=f"{url}/v1/classify"), 405),
        ("wrong method 2", dict(method="DELETE", url=f"{url}/v1/model"), 405),
        ("wrong path", dict(method="GET", url=f"{url}/v1/nothing"), 404),
        ("v2 unknown model", dict(method="GET", url=f"{url}/v2/models/nope"), 404),
        ("v2 not JSON", dict(method="POST", url=f"{url}/v2/models/digits/infer", content=b"{oops"), 400),
        ("v2 empty", dict(method="POST", url=f"{url}/v2/models/digits/infer", content=b""), 400),
        ("v2 bad float shape", dict(method="POST", url=f"{url}/v2/models/digits/infer", json={"inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}), 400),
        ("v2 non-image bytes", dict(method="POST", url=f"{url}/v2/models/digits/infer", json={"inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"text").decode()]}]}),
         415),
    ]
    with httpx.Client(timeout=60) as client:
        for name, request, status in cases:
            r = client.request(**request)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
            assert set(r.json()) == {"error"} and r.json()["error"], name


@needs_serve
def test_a_thousand_bad_requests_then_good_answers(server: Any, reference: dict[str, dict[str, Any]]) -> None:
    import httpx

    url = server.url
    few_kb_bomb = bomb_png(rows=8)
    kinds = [
        (dict(method="POST", url=f"{url}/v1/classify", content=b"GIF89 but not really"), 415),
        (dict(method="POST", url=f"{url}/v1/classify", content=b""), 400),
        (dict(method="POST", url=f"{url}/v1/classify", content=few_kb_bomb), 400),
        (dict(method="POST", url=f"{url}/v1/classify", content=EXAMPLES[0].read_bytes()[:60]), 400),
        (dict(method="GET", url=f"{url}/v1/classify"), 405),
        (dict(method="GET", url=f"{url}/no/such/path"), 404),
        (dict(method="POST", url=f"{url}/v2/models/digits/infer", content=b"[1, 2"), 400),
    ]
    over = (dict(method="POST", url=f"{url}/v1/classify", content=b"\0" * (UPLOAD_MB * 1024 * 1024 + 10)), 413)
    plan = [over if i % 50 == 0 else kinds[i % len(kinds)] for i in range(1000)]

    async def run() -> list[tuple[int, int]]:
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            async def one(request: dict[str, Any], status: int) -> tuple[int, int]:
                async with gate:
                    r = await client.request(**request)
                    assert "error" in r.json()
                    return r.status_code, status
            return list(await asyncio.gather(*(one(req, st) for req, st in plan)))

    got = asyncio.run(run())
    wrong = Counter((g, want) for g, want in got if g != want)
    assert not wrong, f"unexpected statuses (got, wanted): {wrong}"
    with httpx.Client(timeout=60) as client:
        assert client.get(f"{url}/readyz").status_code == 200
        for path in EXAMPLES:
            r = post_image(client, url, path)
            assert r.status_code == 200, r.text
            assert_matches_reference(r.json()[0], path.stem, reference)


@needs_serve
@pytest.mark.skipif(not HAVE_TRITON, reason="tritonclient is not installed (pip install 'tritonclient[http]')")
def test_tritonclient_talks_to_the_server(server: Any, reference: dict[str, dict[str, Any]]) -> None:
    import httpx
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=60, network_timeout=120)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert {i["name"] for i in meta["inputs"]} == {"images", "image"}
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probs": [-1, 10], "labels": [-1]}
    classes = httpx.get(f"{server.url}/v1/model", timeout=30).json()["classes"]
    stems = [p.stem for p in EXAMPLES]

    data = np.array([p.read_bytes() for p in EXAMPLES], dtype=object)
    images = th.InferInput("images", [len(EXAMPLES)], "BYTES")
    images.set_data_from_numpy(data, binary_data=True)
    for binary in (False, True):
        outputs = [th.InferRequestedOutput("probs", binary_data=binary),
                   th.InferRequestedOutput("labels", binary_data=binary)]
        result = client.infer("digits", [images], outputs=outputs)
        labels = [x.decode() if isinstance(x, bytes) else str(x) for x in result.as_numpy("labels")]
        assert labels == stems
        probs = result.as_numpy("probs")
        assert probs.shape == (len(EXAMPLES), len(classes))
        for row, stem in zip(probs, stems, strict=True):
            expected = [reference[stem]["probs"][c] for c in classes]
            np.testing.assert_allclose(row, expected, atol=1e-4)

    floats = np.stack([load_image(p, 16) for p in EXAMPLES[:4]])
    image = th.InferInput("image", list(floats.shape), "FP32")
    image.set_data_from_numpy(floats, binary_data=True)
    result = client.infer("digits", [image])  # no outputs named: every output, in binary
    assert [x.decode() for x in result.as_numpy("labels")] == stems[:4]
    top = client.infer("digits", [images], outputs=[th.InferRequestedOutput("probs", class_count=2)])
    assert [x.decode().split(":")[2] for x in top.as_numpy("probs")[:, 0]] == stems
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("not-digits", [images])


@needs_serve
def test_metrics_count_requests_latency_batches_and_errors(server: Any) -> None:
    import httpx

    wanted = ["ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
              "ray_serve_actual_batch_size_bucket", "ray_serve_num_http_error_requests_total",
              "ray_noop_rt_rejected_requests_total", "ray_noop_rt_images_classified_total"]
    deadline = time.monotonic() + 90  # Ray's exporter publishes every few seconds
    missing = wanted
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        missing = [m for m in wanted if m not in text]
        if missing:
            time.sleep(2)
    assert not missing, f"not in /metrics after 90 s: {missing}"
    assert 'code="415"' in text and 'code="413"' in text


KILLER = r"""
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
def replicas():
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return sorted(n for n in names if n.startswith(sys.argv[2]))
print(json.dumps(replicas()), flush=True)
for line in sys.stdin:
    if line.strip() == "kill":
        name = replicas()[0]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        print(json.dumps(name), flush=True)
    else:
        print(json.dumps(replicas()), flush=True)
"""


class Killer:
    """The KILLER script in a child process (a Ray driver of the server's cluster), asked and answered line by line,
    each answer awaited at most `timeout_s`."""

    def __init__(self, address: str, timeout_s: float = 180) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", KILLER, address, MODEL_PREFIX], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
        self.timeout_s = timeout_s
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout or []], daemon=True).start()

    def read(self) -> Any:
        return json.loads(self.lines.get(timeout=self.timeout_s))

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@needs_serve
def test_an_image_over_the_models_pixel_limit_is_refused_from_its_header(server: Any) -> None:
    """The demo is a 16-px model: a 7000 x 7000 PNG (186 kB on disk, 49 M pixels) is a 400 naming the limit, and
    the server's description says which limits hold."""
    import io

    import httpx

    buffer = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buffer, format="PNG")
    r = httpx.post(server.url + "/v1/classify", content=buffer.getvalue(), timeout=60)
    assert r.status_code == 400 and "16,000,000 pixels" in r.json()["error"]
    limits = httpx.get(server.url + "/v1/model", timeout=60).json()["server"]
    assert (limits["max_pixels"], limits["max_request_pixels"]) == (16_000_000, 64_000_000)


@needs_serve
def test_other_hosts_and_other_origins_are_refused(server: Any) -> None:
    """DNS rebinding (a Host that is not a loopback name) is a 400 on a loopback server; a state-changing request
    from another web origin (a form post, a fetch) is a 403 and never reaches the model; the page's own origin, and
    clients that send no Origin, pass. No CORS header is granted without --cors-origin."""
    import httpx

    image = (EXAMPLES_DIR / "seven.png").read_bytes()
    own = server.url  # http://127.0.0.1:PORT
    with httpx.Client(timeout=60) as client:
        port = own.rsplit(":", 1)[1]
        r = client.get(own + "/v1/model", headers={"Host": f"rebound.attacker.example:{port}"})
        assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]
        assert client.get(own + "/readyz", headers={"Host": "10.0.0.7"}).status_code == 200  # probes: any Host
        assert client.get(own + "/v1/model", headers={"Host": f"localhost:{port}"}).status_code == 200
        for headers in ({"Origin": "https://attacker.example", "Content-Type": "image/png"},
                        {"Origin": "https://attacker.example", "Content-Type": "application/x-www-form-urlencoded"},
                        {"Origin": "null", "Content-Type": "text/plain"},
                        {"Sec-Fetch-Site": "cross-site", "Content-Type": "multipart/form-data; boundary=x"}):
            r = client.post(own + "/v1/classify", content=image, headers=headers)
            assert r.status_code == 403 and "--cors-origin" in r.json()["error"], headers
        preflight = client.options(own + "/v1/classify", headers={"Origin": "https://attacker.example",
                                                                  "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        same = client.post(own + "/v1/classify", content=image,
                           headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200 and same.json()[0]["top"][0]["class"] == "seven"
        read = client.get(own + "/v1/model", headers={"Origin": "https://attacker.example"})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


@needs_serve
def test_the_server_and_its_local_ray_cluster_listen_on_loopback_only(server: Any) -> None:
    """psutil lists the listening sockets of every process of the server's session (its local Ray cluster: GCS,
    raylet, agents, Serve's controller, proxy and replicas): none is on a public interface or on all of them."""
    from noop_rt.serve.launch import public_sockets

    sockets = server.listening()
    names = " ".join(name for _, _, name in sockets)
    assert "gcs_server" in names and "raylet" in names and "ServeReplica" in names, sockets  # the cluster is seen
    assert int(server.url.rsplit(":", 1)[1]) in {port for _, port, _ in sockets}
    assert public_sockets(sockets) == []


@needs_serve
def test_a_request_of_many_images_does_not_hold_the_model(server: Any) -> None:
    """192 images in one request go to the model in slices of --max-batch-size, a few at a time: a one-image request
    sent while they run is answered long before them, not after all of them."""
    import httpx

    image = (EXAMPLES_DIR / "seven.png").read_bytes()
    files = [("files", (f"{i}.png", image, "image/png")) for i in range(192)]
    found: dict[str, Any] = {}

    def big() -> None:
        t0 = time.monotonic()
        found["big"] = httpx.post(server.url + "/v1/classify", files=files, timeout=300)
        found["big_s"] = time.monotonic() - t0

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.5)  # the big request's images are decoded and in the model's queue
    t0 = time.monotonic()
    small = httpx.post(server.url + "/v1/classify", content=image, timeout=300)
    small_s = time.monotonic() - t0
    thread.join()
    answers = found["big"].json()
    assert found["big"].status_code == 200 and [a["top"][0]["class"] for a in answers] == ["seven"] * 192
    assert [a["image"] for a in answers] == [f"{i}.png" for i in range(192)]  # in order
    assert small.status_code == 200 and small.json()[0]["top"][0]["class"] == "seven"
    assert small_s < found["big_s"] / 3, (small_s, found["big_s"])


@needs_serve
def test_a_replica_killed_mid_load_is_replaced_and_no_request_is_lost(server: Any) -> None:
    """ray.kill one of the two model replicas while requests flow: every request ends as a correct answer or a 5xx
    (both counted, none lost), Serve starts a new replica, and the server answers correctly afterwards."""
    import httpx

    address = server.ray_address
    assert address, "the server did not say where its Ray cluster is"
    killer = Killer(address)
    try:
        before = killer.read()
        assert len(before) == 2, before
        outcomes: list[tuple[str, Any]] = []
        state = {"killed_at": -1}

        async def load() -> None:
            gate = asyncio.Semaphore(8)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i: int) -> None:
                    path = EXAMPLES[i % len(EXAMPLES)]
                    async with gate:
                        try:
                            r = await post_image(client, server.url, path)
                        except httpx.HTTPError as exc:  # a dropped connection would be a lost request
                            outcomes.append(("lost", repr(exc)))
                            return
                    if r.status_code == 200:
                        outcomes.append(("ok" if r.json()[0]["top"][0]["class"] == path.stem else "wrong", path.stem))
                    elif r.status_code >= 500 and "error" in r.json():
                        outcomes.append(("5xx", r.status_code))
                    else:
                        outcomes.append(("other", r.status_code))

                i = 0
                tasks = []
                # keep the load going until the kill is done and 40 more requests have been answered (bounded)
                while i < 3000 and (state["killed_at"] < 0 or len(outcomes) < state["killed_at"] + 40):
                    tasks.append(asyncio.create_task(one(i)))
                    i += 1
                    await asyncio.sleep(0.005 if len(tasks) - len(outcomes) < 16 else 0.05)
                await asyncio.gather(*tasks)

        thread = threading.Thread(target=lambda: asyncio.run(load()))
        thread.start()
        deadline = time.monotonic() + 120
        while len(outcomes) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = killer.ask("kill")
        state["killed_at"] = len(outcomes)
        thread.join(600)
        assert not thread.is_alive()
        counts = Counter(kind for kind, _ in outcomes)
        assert set(counts) <= {"ok", "5xx"}, counts  # every request: a right answer or a counted 5xx
        assert counts["ok"] + counts["5xx"] == len(outcomes) and counts["ok"] > 0
        print(f"killed {killed} after {state['killed_at']} answers; outcomes {dict(counts)}")

        deadline = time.monotonic() + 180
        now = before
        while time.monotonic() < deadline:
            now = killer.ask("list")
            if len(now) == 2 and killed not in now:
                break
            time.sleep(1)
        assert len(now) == 2 and killed not in now, f"no replacement for {killed}: {now}"
    finally:
        killer.close()
    with httpx.Client(timeout=60) as client:
        for path in EXAMPLES:
            r = post_image(client, server.url, path)
            assert r.status_code == 200 and r.json()[0]["top"][0]["class"] == path.stem


@needs_serve
def test_sigterm_drains_in_flight_requests_then_exits_0(server: Any) -> None:
    """Last: requests in flight when SIGTERM arrives are all answered, readiness turns false, the exit code is 0."""
    import httpx

    order = EXAMPLES * 6

    async def run() -> tuple[list[Any], dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            tasks = [asyncio.create_task(post_image(client, server.url, p)) for p in order]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                health = (await client.get(f"{server.url}/healthz")).json()
                if health["inflight"] >= 8:
                    break
                await asyncio.sleep(0.01)
            assert server.proc.poll() is None
            server.proc.send_signal(signal.SIGTERM)
            ready: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = await client.get(f"{server.url}/readyz")
                if r.status_code == 503:
                    ready = r.json()
                    break
                await asyncio.sleep(0.02)
            return list(await asyncio.gather(*tasks)), ready

    responses, ready = asyncio.run(run())
    assert ready == {"ready": False, "reason": "draining"}
    for path, r in zip(order, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()[0]["top"][0]["class"] == path.stem
    assert server.proc.wait(120) == 0, server.tail()
    assert "drained" in "\n".join(server.stderr)
    time.sleep(0.5)  # the reader threads see the pipes close
    assert [line for line in server.stdout if line.strip()] == [server.url]  # stdout: the URL, once


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser goes
    b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 900 + b"1" + b"]" * 900
    + b"}]}",  # parses, then nests too deep for the tensor reader
])
def test_deeply_nested_json_is_a_400(body: bytes) -> None:
    with pytest.raises(RequestError) as refused:
        kserve.parse_infer_request(body, None)
    assert refused.value.status == 400


def test_pixel_limits_follow_the_model_and_bound_a_request() -> None:
    from noop_rt.serve.options import default_max_pixels
    from noop_rt.serve.uploads import check_float_images, check_request_pixels

    assert default_max_pixels(16) == default_max_pixels(256) == 16_000_000  # a floor for small models
    assert default_max_pixels(512) == 64 * 512 * 512 and default_max_pixels(1024) == 64 * 1024 * 1024
    assert ServeOptions().pixel_limits(16) == (16_000_000, 64_000_000)
    assert ServeOptions(max_pixels=1000).pixel_limits(16) == (1000, 4000)

    def png(width: int, height: int) -> bytes:
        import io

        buffer = io.BytesIO()
        Image.new("1", (width, height)).save(buffer, format="PNG")  # a few bytes per megapixel on disk
        return buffer.getvalue()

    with pytest.raises(RequestError) as one:  # 7000 x 7000 is over 16 M: refused from its header
        check_request_pixels([("big.png", png(7000, 7000))], 16_000_000, 64_000_000)
    assert one.value.status == 400 and "big.png" in one.value.message
    five = [(f"f{i}.png", png(3000, 3000)) for i in range(8)]  # each under the limit, 72 M in all
    with pytest.raises(RequestError) as many:
        check_request_pixels(five, 16_000_000, 64_000_000)
    assert many.value.status == 413 and "72,000,000 pixels" in many.value.message
    check_request_pixels(five[:7], 16_000_000, 64_000_000)  # 63 M: within the budget
    with pytest.raises(RequestError, match="1000 images in one request"):
        check_float_images(np.zeros((1000, 3, 16, 16), np.float32), 16, 256)
