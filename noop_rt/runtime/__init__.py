"""Backends (torch, onnxruntime, TensorRT) behind one interface, and the classifier that drives `scoring.py`."""
