"""Store the weights of several ONNX graphs once: every large initializer goes to one external-data file, identical
tensors (the UNet inside both the classifier and the scorer graph) at one offset. ONNX's external-data mechanism
(location + offset + length per tensor) is what every runtime reads, so each graph stays a standard ONNX file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

ALIGN = 64  # small tensors: offsets aligned for SIMD loads, as safetensors aligns
PAGE_ALIGN = 65536  # tensors of 1 MB and more: the allocation granularity (64 KiB on Windows, a multiple of Linux's
# 4 KiB), so onnxruntime can memory-map them instead of copying them to the heap
PAGE_ALIGN_FROM = 1 << 20
MIN_BYTES = 1024  # smaller tensors stay inside their graph


def _raw(tensor: Any) -> bytes:
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def share_weights(models: dict[str, Any], folder: Path, weights_file: str = "weights.bin") -> dict[str, Any]:
    """Move the initializers of `models` ({file name: ModelProto with its data loaded}) into `folder/weights_file`
    (deduplicated by content) and save each model as `folder/<file name>`. Returns a summary for the manifest."""
    import onnx
    from onnx.external_data_helper import set_external_data

    offsets: dict[str, tuple[int, int]] = {}
    written = 0
    unique = 0
    referenced = 0
    with open(folder / weights_file, "wb") as fh:
        for model in models.values():
            tensors = list(model.graph.initializer)
            for tensor in tensors:
                data = _raw(tensor)
                if len(data) < MIN_BYTES:
                    continue
                key = hashlib.sha256(data).hexdigest()
                if key not in offsets:
                    pad = (-written) % (PAGE_ALIGN if len(data) >= PAGE_ALIGN_FROM else ALIGN)
                    fh.write(b"\0" * pad)
                    written += pad
                    offsets[key] = (written, len(data))
                    fh.write(data)
                    written += len(data)
                    unique += len(data)
                referenced += len(data)
                offset, length = offsets[key]
                for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(typed)
                tensor.raw_data = b"\0"  # set_external_data wants a raw_data field; it is cleared right after
                set_external_data(tensor, location=weights_file, offset=offset, length=length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
    for name, model in models.items():
        onnx.save_model(model, str(folder / name))
        onnx.checker.check_model(str(folder / name))
    return {"file": weights_file, "bytes": written, "unique_tensor_bytes": unique,
            "referenced_tensor_bytes": referenced, "graphs": sorted(models)}
