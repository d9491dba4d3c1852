"""Artifacts from checkpoints: ONNX bundles (export), INT8 quantisation, shared weights, TensorRT plans, and the
SD-shape fixtures that bench times. May import: noop_rt.train, noop_rt.runtime, noop_rt.demo."""
