"""`noop-rt export --int8`: post-training static INT8 quantization of the classifier graph with onnxruntime's
quantizer (QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration), calibrated on the
checkpoint's own few-shot (training) images. Export then refuses the result (exit 3) unless its top-1 agrees with
the fp32 classifier on the validation split, which calibration did not see (>= 99 %). The quantized graph is
calibrated for the trained class embeddings: other class sets run through the fp32 encoder, noise and scorer graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.images import load_image
from noop_rt.train.checkpoint import NoopCheckpoint

CALIBRATION_BATCH = 4


def checkpoint_images(ckpt: NoopCheckpoint, resolution: int, which: tuple[str, ...],
                      given: list[Path] | None = None) -> tuple[np.ndarray, str]:
    """The checkpoint's own training (`fewshot`) and/or validation (`val`) images: for the demo its split, else the
    paths training recorded (`train.images`); `given` replaces them."""
    if given:
        return np.stack([load_image(p, resolution) for p in given]), f"{len(given)} given images"
    if ckpt.backbone_source == "demo":
        from noop_rt.demo.digits import split_tensors

        parts = [split_tensors(name)[0].numpy() for name in which]
        return np.concatenate(parts), f"{sum(map(len, parts))} demo {'+'.join(which)} digits"
    recorded = ckpt.train.get("images") or {}
    keys = {"fewshot": "train", "val": "val"}
    paths = [p for name in which for p in recorded.get(keys[name], [])]
    if not paths:
        raise BadInputError("this checkpoint does not record its training images (trained by an older noop-rt): pass "
                            "--calibrate-data DIR with its few-shot and validation images")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise BadInputError(f"{len(missing)} of the checkpoint's recorded images are gone (first: {missing[0]}): pass "
                            "--calibrate-data DIR")
    return np.stack([load_image(p, resolution) for p in paths]), f"{len(paths)} recorded {'+'.join(which)} images"


def computed_constants(graph: Any) -> set[str]:
    """Tensors computed from constants alone, not from the image (the learned noise expanded to the batch, the fixed
    timestep's embedding, projections of the built-in class embeddings). Shapes do not make a tensor depend on the
    image: the batch size is read from it, not its values."""
    initializers = {t.name for t in graph.initializer}
    dynamic = {i.name for i in graph.input} - initializers
    for node in graph.node:
        if node.op_type not in ("Shape", "Size") and any(x in dynamic for x in node.input if x):
            dynamic.update(node.output)
    return {o for node in graph.node for o in node.output} - dynamic


def computed_constant_consumers(model: Any) -> list[str]:
    """Nodes that take a computed constant: left in fp32 (quantizing a constant buys no speed, and OpenVINO's
    low-precision transformations fail on Quantize/Dequantize pairs around them: an Add of the expanded noise, the
    time-embedding Gemm)."""
    computed = computed_constants(model.graph)
    return [n.name for n in model.graph.node if n.name and any(x in computed for x in n.input if x)]


def strip_constant_qdq(model: Any) -> int:
    """Remove the QuantizeLinear -> DequantizeLinear pairs the quantizer still put on computed constants (where an
    image-dependent node consumes them; run once the class embeddings are baked in, which makes their projections
    constants too), so that OpenVINO compiles the graph; returns how many. The weights' own
    DequantizeLinear nodes (int8 initializers) stay."""
    graph = model.graph
    computed = computed_constants(graph)
    pairs = [q for q in graph.node if q.op_type == "QuantizeLinear" and q.input[0] in computed]
    for q in pairs:
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]:
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == dq.output[0]:
                        node.input[i] = q.input[0]
            for out in graph.output:
                if out.name == dq.output[0]:
                    raise ValueError(f"{out.name} is a graph output behind a Quantize/Dequantize pair")
            graph.node.remove(dq)
        graph.node.remove(q)
    return len(pairs)


def quantize_classifier(model: Any, images: np.ndarray, class_embeddings: np.ndarray, work: Path) -> Any:
    """An INT8 (QDQ) copy of the classifier graph `model` (a ModelProto whose `class_embeddings` is still a plain
    input), calibrated by running `images` through it."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    large = model.ByteSize() > 1_800_000_000
    src, pre, out = work / "classifier_fp32.onnx", work / "classifier_pre.onnx", work / "classifier_int8.onnx"
    onnx.save_model(model, str(src), save_as_external_data=large, all_tensors_to_one_file=True,
                    location="classifier_fp32.data")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": images[i:i + CALIBRATION_BATCH], "class_embeddings": class_embeddings}
                                 for i in range(0, len(images), CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    excluded = computed_constant_consumers(onnx.load(str(pre), load_external_data=False))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a warning per 1-D normalisation constant it leaves per-tensor
    try:
        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                        nodes_to_exclude=excluded, extra_options={"ActivationSymmetric": False})
    finally:
        root.setLevel(level)
    return onnx.load(str(out), load_external_data=True)
