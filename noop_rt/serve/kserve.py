"""The Open Inference Protocol (KServe v2 REST, as Triton, KServe and MLServer speak it) for the classifier, with
Triton's binary tensor data extension. Pure functions over bytes and arrays: the ingress routes to them.

The model takes ONE input:
- `images`: BYTES [B], encoded image files. Image bytes cannot travel in JSON, so send them as binary tensor data
  (the `Inference-Header-Content-Length` header gives the JSON's length; the bytes after it hold each input with
  `parameters.binary_data_size`; a BYTES element is a 4-byte little-endian length, then its bytes), as
  `tritonclient` does. In JSON, each element is the base64 of an image file.
- `image`: FP32 [B, 3, R, R], the classifier graph's own input (preprocessed, in [-1, 1]), binary or JSON.

Outputs: `probs` FP32 [B, C] (class order of `GET /v1/model`; Triton's `classification` parameter turns it into
the top-k "prob:index:label" strings) and `labels` BYTES [B]. JSON unless binary is asked for (per output
`parameters.binary_data`, or the request's `parameters.binary_data_output`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from noop_rt.serve.uploads import RequestError

VERSION = "1"
HEADER = "Inference-Header-Content-Length"
INPUT_BYTES = "images"
INPUT_FLOAT = "image"
OUTPUT_PROBS = "probs"
OUTPUT_LABELS = "labels"
EXTENSIONS = ["binary_tensor_data", "classification"]


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # FP32 array of `shape`, or the BYTES elements (flattened)


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-k "prob:index:label" strings instead of the probabilities


@dataclass
class InferRequest:
    input: Tensor
    outputs: list[RequestedOutput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- metadata
def model_metadata(name: str, resolution: int, classes: list[str]) -> dict[str, Any]:
    return {"name": name, "versions": [VERSION], "platform": "noop-rt",
            "inputs": [{"name": INPUT_BYTES, "datatype": "BYTES", "shape": [-1]},
                       {"name": INPUT_FLOAT, "datatype": "FP32", "shape": [-1, 3, resolution, resolution]}],
            "outputs": [{"name": OUTPUT_PROBS, "datatype": "FP32", "shape": [-1, len(classes)]},
                        {"name": OUTPUT_LABELS, "datatype": "BYTES", "shape": [-1]}]}


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "noop-rt", "version": version, "extensions": EXTENSIONS}


# ---------------------------------------------------------------------------------------------- BYTES tensors
def serialize_bytes(elements: list[bytes]) -> bytes:
    """Triton's BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> list[bytes]:
    """Exactly `count` length-prefixed elements filling `buffer`; 400 otherwise."""
    view = memoryview(buffer)
    out: list[bytes] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < 4:
            raise RequestError(400, "BYTES tensor data ends inside a 4-byte length prefix")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if n > len(view) - pos:
            raise RequestError(400, f"BYTES element {len(out)} claims {n} bytes; only {len(view) - pos} remain")
        out.append(bytes(view[pos:pos + n]))
        pos += n
    if len(out) != count:
        raise RequestError(400, f"BYTES tensor holds {len(out)} element(s); its shape says {count}")
    return out


# ---------------------------------------------------------------------------------------------- requests
def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The inference request of a body (JSON, or JSON + binary tensor data); a malformed one of any shape, nesting
    deeper than the parser goes included, is a 400."""
    try:
        return _parse_infer_request(body, header_length)
    except RecursionError:  # no inference request is nested like that
        raise RequestError(400, "the inference request's JSON is nested too deeply") from None


def _parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """A v2 infer request: JSON, or JSON then binary tensor data when `Inference-Header-Content-Length` is set."""
    if not body:
        raise RequestError(400, "empty request body: send a v2 inference request (JSON)")
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(400, f"bad {HEADER} header: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise RequestError(400, f"{HEADER} {n} is outside the body's {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = f" (binary tensor data needs the {HEADER} header)" if header_length is None else ""
        raise RequestError(400, f"the inference request is not valid JSON{hint}: {exc}") from None

    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError(400, "the inference request must be a JSON object with an 'inputs' list")
    inputs = doc["inputs"]
    if len(inputs) != 1:
        raise RequestError(400, f"give exactly one input: {INPUT_BYTES} (BYTES [B], encoded images) or "
                                f"{INPUT_FLOAT} (FP32 [B, 3, R, R]); got {len(inputs)}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be an object")
    tensor, used = _parse_input(inputs[0], binary)
    if used != len(binary):
        raise RequestError(400, f"{len(binary) - used} byte(s) of binary data follow the inputs unclaimed")
    request_id = doc.get("id")
    return InferRequest(input=tensor, outputs=_parse_outputs(doc.get("outputs"), bool(params.get(
        "binary_data_output", False))), id=str(request_id) if request_id is not None else None, parameters=params)


def _shape(spec: dict[str, Any]) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(400, f"input {spec.get('name')!r}: 'shape' must be a list of non-negative integers")
    if shape[0] < 1:
        raise RequestError(400, f"input {spec.get('name')!r}: the batch dimension must be at least 1")
    return shape


def _parse_input(spec: Any, binary: memoryview) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise RequestError(400, "each input must be a JSON object")
    name, datatype = spec.get("name"), spec.get("datatype")
    shape = _shape(spec)
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None and (not isinstance(size, int) or size < 0 or size > len(binary)):
        raise RequestError(400, f"input {name!r}: binary_data_size {size!r} is outside the {len(binary)} binary "
                                "bytes sent")
    raw = binary[:size] if size is not None else None
    if name == INPUT_BYTES:
        if datatype != "BYTES":
            raise RequestError(400, f"input {INPUT_BYTES!r} must be BYTES (encoded image files), not {datatype}")
        if len(shape) != 1:
            raise RequestError(400, f"input {INPUT_BYTES!r} must have shape [B], got {shape}")
        if raw is not None:
            return Tensor(name, datatype, shape, deserialize_bytes(raw, count)), size or 0
        return Tensor(name, datatype, shape, _base64_elements(spec.get("data"), count)), 0
    if name == INPUT_FLOAT:
        if datatype != "FP32":
            raise RequestError(400, f"input {INPUT_FLOAT!r} must be FP32, not {datatype}")
        if raw is not None:
            if len(raw) != 4 * count:
                raise RequestError(400, f"input {INPUT_FLOAT!r}: {len(raw)} bytes of FP32 data for shape {shape} "
                                        f"({4 * count} expected)")
            array = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
            return Tensor(name, datatype, shape, array), size or 0
        try:
            array = np.asarray(spec.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise RequestError(400, f"input {INPUT_FLOAT!r}: 'data' must be a list of numbers") from None
        if array.size != count:
            raise RequestError(400, f"input {INPUT_FLOAT!r}: {array.size} values for shape {shape} ({count} expected)")
        return Tensor(name, datatype, shape, array.reshape(shape)), 0
    raise RequestError(400, f"unknown input {name!r}: the model takes {INPUT_BYTES!r} (BYTES [B], encoded images) "
                            f"or {INPUT_FLOAT!r} (FP32 [B, 3, R, R])")


def _base64_elements(data: Any, count: int) -> list[bytes]:
    flat = _flatten(data)
    if len(flat) != count or not all(isinstance(x, str) for x in flat):
        raise RequestError(400, f"input {INPUT_BYTES!r} in JSON: 'data' must hold {count} base64 string(s) of image "
                                "files (or send the bytes as binary tensor data)")
    try:
        return [base64.b64decode(x, validate=True) for x in flat]
    except (binascii.Error, ValueError):
        raise RequestError(400, f"input {INPUT_BYTES!r} in JSON: each element must be the base64 of an image file; "
                                "raw bytes travel as binary tensor data") from None


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [y for x in data for y in _flatten(x)]
    return [data]


def _parse_outputs(specs: Any, binary_default: bool) -> list[RequestedOutput]:
    if specs is None:
        return [RequestedOutput(OUTPUT_PROBS, binary_default), RequestedOutput(OUTPUT_LABELS, binary_default)]
    if not isinstance(specs, list) or not specs:
        raise RequestError(400, "'outputs' must be a non-empty list")
    out = []
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in (OUTPUT_PROBS, OUTPUT_LABELS):
            raise RequestError(400, f"unknown output {name!r}: the model gives {OUTPUT_PROBS!r} and "
                                    f"{OUTPUT_LABELS!r}")
        params = spec.get("parameters") or {}
        k = params.get("classification", 0)
        if not isinstance(k, int) or k < 0:
            raise RequestError(400, f"output {name!r}: 'classification' must be a non-negative integer")
        if k and name != OUTPUT_PROBS:
            raise RequestError(400, f"'classification' applies to {OUTPUT_PROBS!r}, not {name!r}")
        out.append(RequestedOutput(name, bool(params.get("binary_data", binary_default)), k))
    return out


# ---------------------------------------------------------------------------------------------- responses
def infer_response(model_name: str, request: InferRequest, probs: np.ndarray, labels: list[str],
                   classes: list[str]) -> tuple[bytes, dict[str, str]]:
    """(body, headers): JSON, or JSON then the binary outputs with `Inference-Header-Content-Length`."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    batch = len(labels)
    for want in request.outputs:
        if want.name == OUTPUT_PROBS and want.classification:
            k = min(want.classification, len(classes))
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            strings = [f"{probs[i, c]:f}:{c}:{classes[c]}" for i in range(batch) for c in order[i]]
            tensor = _bytes_output(OUTPUT_PROBS, [batch, k], strings, want.binary, blobs)
        elif want.name == OUTPUT_PROBS:
            array = np.ascontiguousarray(probs, dtype="<f4")
            tensor = {"name": OUTPUT_PROBS, "datatype": "FP32", "shape": list(array.shape)}
            if want.binary:
                blobs.append(array.tobytes())
                tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                tensor["data"] = [float(x) for x in array.reshape(-1)]
        else:
            tensor = _bytes_output(OUTPUT_LABELS, [batch], labels, want.binary, blobs)
        outputs.append(tensor)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER: str(len(head))}


def _bytes_output(name: str, shape: list[int], strings: list[str], binary: bool, blobs: list[bytes]) \
        -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": shape}
    if binary:
        blobs.append(serialize_bytes([s.encode() for s in strings]))
        tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
    else:
        tensor["data"] = strings
    return tensor
