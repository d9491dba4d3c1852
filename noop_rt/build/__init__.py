"""Artifacts from checkpoints: ONNX bundles (export), INT8 quantisation, shared weights, TensorRT plans, and the
SD-shape fixtures that bench times. May import: noop_rt.train, noop_rt.runtime, noop_rt.demo."""

# The random-weight models of real architectures that `noop-rt bench --backbone NAME` times (shape_fixtures.py builds
# them); named here so that the CLI can check a name without importing torch.
SHAPE_FIXTURES = ("sd15-shape", "sdxl-shape")
