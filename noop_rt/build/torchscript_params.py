"""Export a graph with the TorchScript ONNX exporter without its weights passing through a ModelProto.

`torch.onnx.export(dynamo=False)` builds the whole ModelProto in memory for a graph under 2 GB: the C++ proto, its
serialized string and the Python bytes object each hold a copy of every weight next to the module's own (measured:
+3.1x the graph's weights at the peak for an fp16 stack of Linear layers), and an fp16 Stable Diffusion UNet graph is
under 2 GB. Past 2 GB it writes one file per tensor instead. Here the graph is exported with `export_params=False`
(no weight in the proto), while the exporter's named parameters (after its constant folding and deduplication) are
captured from `_model_to_graph`; `attach_params` then turns the graph's parameter inputs back into initializers
whose bytes go straight into the bundle's weights file, one tensor at a time.

`_model_to_graph` is a private function of torch's TorchScript exporter: where it is missing (another torch),
`exported_params` yields None and the caller exports with the weights inside, as torch.onnx does by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from noop_rt.build.shared_weights import MIN_BYTES, WeightsFile


@contextlib.contextmanager
def exported_params() -> Iterator[dict[str, Any] | None]:
    """Within the block, the TorchScript exporter's `{input name: tensor}` of its graph's parameters is recorded in
    the yielded dict under "params" (None: this torch's exporter cannot be hooked; export with the weights)."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
    except ImportError:
        yield None
        return
    real = getattr(exporter, "_model_to_graph", None)
    if real is None:
        yield None
        return
    box: dict[str, Any] = {}

    def recording(*args: Any, **kwargs: Any) -> Any:
        graph, params, out = real(*args, **kwargs)
        box["params"] = params
        return graph, params, out

    exporter._model_to_graph = recording
    try:
        yield box
    finally:
        exporter._model_to_graph = real


def attach_params(model: Any, params: dict[str, torch.Tensor], weights: WeightsFile) -> int:
    """Turn each graph input of `model` that names a captured parameter into an initializer: its bytes written to
    `weights` (deduplicated), small ones (< MIN_BYTES) inside the graph. Returns the number attached."""
    import onnx

    attached = 0
    for value in list(model.graph.input):
        tensor = params.get(value.name)
        if tensor is None:
            continue
        array = tensor.detach().to("cpu").contiguous().numpy() if tensor.dtype != torch.bfloat16 else None
        if array is None:
            raise ValueError(f"parameter {value.name} is bfloat16, which this export does not write")
        proto = onnx.TensorProto()
        proto.name = value.name
        proto.data_type = value.type.tensor_type.elem_type
        proto.dims.extend(array.shape)
        data = np.ascontiguousarray(array).tobytes()
        if len(data) < MIN_BYTES:
            proto.raw_data = data
        else:
            weights.place_external(proto, data)
        del data, array
        model.graph.initializer.append(proto)
        model.graph.input.remove(value)
        attached += 1
    return attached
