"""An ONNX file's `metadata_props` (the model's key/value strings), read without onnx or an engine session.

A ModelProto is a protobuf message whose top-level fields are read here by their wire format, the graph (field 7,
often most of the file) skipped by its length; only field 14 (`metadata_props`, StringStringEntryProto: key = 1,
value = 2) is decoded. The classifier graph's metadata holds the class names and prompts it was exported for, which
`Bundle.open` compares with manifest.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

METADATA_PROPS = 14
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def _varint(fh: BinaryIO) -> int | None:
    shift = value = 0
    while True:
        byte = fh.read(1)
        if not byte:
            return None if shift == 0 else -1
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            return -1


def _entry(blob: bytes) -> tuple[str, str]:
    """key, value of one StringStringEntryProto."""
    import io

    fh, out = io.BytesIO(blob), {1: "", 2: ""}
    while (tag := _varint(fh)) is not None and tag > 0:
        size = _varint(fh) if tag & 7 == LENGTH else None
        if size is None or size < 0:
            break
        out[tag >> 3] = fh.read(size).decode("utf-8", "replace")
    return out[1], out[2]


def read_metadata_props(path: str | Path) -> dict[str, str] | None:
    """{key: value} of the model's metadata_props; None if the file does not read as a ModelProto."""
    props: dict[str, str] = {}
    with open(path, "rb") as fh:
        while (tag := _varint(fh)) is not None:
            if tag <= 0:
                return None
            wire = tag & 7
            if wire == VARINT:
                if _varint(fh) in (None, -1):
                    return None
            elif wire == FIXED64:
                fh.seek(8, 1)
            elif wire == FIXED32:
                fh.seek(4, 1)
            elif wire == LENGTH:
                size = _varint(fh)
                if size is None or size < 0:
                    return None
                if tag >> 3 == METADATA_PROPS:
                    key, value = _entry(fh.read(size))
                    props[key] = value
                else:
                    fh.seek(size, 1)
            else:
                return None
    return props
