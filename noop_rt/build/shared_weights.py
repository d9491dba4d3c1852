"""Store the weights of several ONNX graphs once, one graph at a time: every large initializer goes to one
external-data file, identical tensors (the UNet inside both the classifier and the scorer graph) at one offset. ONNX's
external-data mechanism (location + offset + length per tensor) is what every runtime reads, so each graph stays a
standard ONNX file.

`WeightsFile.add` takes one exported graph (its ModelProto read without its external data) and copies its tensors
into the shared file one tensor at a time, from wherever the exporter put them (inside the graph, or the exporter's
own external files beside it): memory holds one tensor, never a graph's weights. A graph's own external files are
deleted as they are copied, so the disk holds the weights about once too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

ALIGN = 64  # small tensors: offsets aligned for SIMD loads, as safetensors aligns
PAGE_ALIGN = 65536  # tensors of 1 MB and more: the allocation granularity (64 KiB on Windows, a multiple of Linux's
# 4 KiB), so onnxruntime can memory-map them instead of copying them to the heap
PAGE_ALIGN_FROM = 1 << 20
MIN_BYTES = 1024  # smaller tensors stay inside their graph
TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _inline_bytes(tensor: Any) -> bytes:
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _external_bytes(tensor: Any, base: Path) -> tuple[bytes, Path]:
    """The bytes of an initializer stored outside its graph (location relative to the graph's folder)."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    path = base / info.location
    with open(path, "rb") as fh:
        fh.seek(int(info.offset or 0))
        data = fh.read(int(info.length)) if info.length else fh.read()
    return data, path


class WeightsFile:
    """One append-only external-data file shared by the graphs added to it, deduplicated by content (sha256)."""

    def __init__(self, folder: Path, name: str = "weights.bin") -> None:
        self.folder = folder
        self.name = name
        self.fh = open(folder / name, "wb")  # noqa: SIM115 - closed by close()
        self.offsets: dict[str, tuple[int, int]] = {}
        self.written = 0
        self.unique = 0
        self.referenced = 0

    def _place(self, data: bytes) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest()
        if key not in self.offsets:
            pad = (-self.written) % (PAGE_ALIGN if len(data) >= PAGE_ALIGN_FROM else ALIGN)
            self.fh.write(b"\0" * pad)
            self.written += pad
            self.offsets[key] = (self.written, len(data))
            self.fh.write(data)
            self.written += len(data)
            self.unique += len(data)
        self.referenced += len(data)
        return self.offsets[key]

    def place_external(self, tensor: Any, data: bytes) -> None:
        """Store `data` (the bytes of `tensor`) in this file and make `tensor` point at them."""
        import onnx
        from onnx.external_data_helper import set_external_data

        offset, length = self._place(data)
        for typed in TYPED_FIELDS:
            tensor.ClearField(typed)
        tensor.raw_data = b"\0"  # set_external_data wants a raw_data field; it is cleared right after
        set_external_data(tensor, location=self.name, offset=offset, length=length)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def add(self, model: Any, base: Path | None = None) -> Any:
        """Re-home every initializer of `model` of MIN_BYTES or more (and every one the exporter stored outside the
        graph, which lives in `base`) into this file; `model` is changed in place and returned. The exporter's own
        external files are removed once copied."""
        import onnx

        used: set[Path] = set()
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                if {e.key: e.value for e in tensor.external_data}.get("location") == self.name:
                    continue  # written here already (`place_external`)
                if base is None:
                    raise ValueError(f"initializer {tensor.name} is stored outside its graph; pass its folder")
                data, path = _external_bytes(tensor, base)
                used.add(path)
                del tensor.external_data[:]
            else:
                data = _inline_bytes(tensor)
                if len(data) < MIN_BYTES:
                    continue
            self.place_external(tensor, data)
            del data
        for path in used:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return model

    def save(self, model: Any, file: str) -> None:
        """Write a graph whose weights this file holds beside it, and check it."""
        import onnx

        self.fh.flush()
        onnx.save_model(model, str(self.folder / file))
        onnx.checker.check_model(str(self.folder / file))

    def close(self, graphs: list[str]) -> dict[str, Any]:
        """Finish the file; returns a summary for the manifest."""
        self.fh.close()
        return {"file": self.name, "bytes": self.written, "unique_tensor_bytes": self.unique,
                "referenced_tensor_bytes": self.referenced, "graphs": sorted(graphs)}


def share_weights(models: dict[str, Any], folder: Path, weights_file: str = "weights.bin") -> dict[str, Any]:
    """Move the initializers of `models` ({file name: ModelProto with its data loaded}) into `folder/weights_file`
    (deduplicated by content) and save each model as `folder/<file name>`. Returns a summary for the manifest."""
    weights = WeightsFile(folder, weights_file)
    for name, model in models.items():
        weights.save(weights.add(model), name)
    return weights.close(list(models))
