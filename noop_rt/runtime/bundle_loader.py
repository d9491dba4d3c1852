"""Open an exported bundle on the best available backend: TensorRT engines, else onnxruntime (CUDA, then CPU)."""

from __future__ import annotations

import torch

from noop_rt.bundle import Bundle
from noop_rt.errors import BadInputError
from noop_rt.runtime.classifier import Classifier, ClassSpec
from noop_rt.runtime.loader import Request, _with_classes


def open_bundle_classifier(req: Request) -> Classifier:
    bundle = Bundle.open(req.bundle)
    m = bundle.manifest
    backend = None
    if req.backend in ("auto", "tensorrt"):
        from noop_rt.engines import open_tensorrt_backend

        backend = open_tensorrt_backend(bundle, required=req.backend == "tensorrt", engines_dir=req.engines)
    if backend is None and req.backend in ("auto", "onnxruntime"):
        from noop_rt.runtime.onnx_backend import OnnxBackend

        backend = OnnxBackend(bundle, device=req.device)
    if backend is None:
        raise BadInputError(f"--backend {req.backend} cannot run a bundle; use onnxruntime or tensorrt "
                            "(or --ckpt for the torch backend)")
    spec = ClassSpec(bundle.classes, list(m["prompts"]), torch.from_numpy(bundle.class_embeddings()),
                     float(m["tau"]), int(m["t_star"]), str(m["loss"]), m.get("template"))
    spec = _with_classes(spec, req, bool(m.get("prompt_tuned")))
    return Classifier(backend, spec, max_batch=min(req.max_batch, int(m["max_batch"])))
