"""noop-rt: diffusion classifiers at one UNet pass per class (NoOp), deployed with ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
