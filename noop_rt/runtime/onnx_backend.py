"""The onnxruntime backend: one InferenceSession per bundle graph, created once.

CUDA execution provider when onnxruntime-gpu and a GPU are there (IO binding on torch CUDA tensors, so the noise
graph's output stays on the device and feeds the UNet), else the CPU provider. The provider that actually runs is
read back from the session (`get_providers()`), never assumed: onnxruntime falls back to CPU silently.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from noop_rt.bundle import Bundle
from noop_rt.errors import BundleError, MissingDependencyError
from noop_rt.runtime.base import GraphBackend

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
GPU_HINT = ("pip uninstall -y onnxruntime && pip install 'noop-rt[gpu]' (onnxruntime-gpu) on a machine with an "
            "NVIDIA GPU and CUDA")


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort
        from transformers import CLIPTokenizer

        from noop_rt.backbone import quiet_libraries

        quiet_libraries()
        self.bundle = bundle
        m = bundle.manifest
        want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if want_cuda and not cuda_provider_available():
            if device.startswith("cuda"):
                raise MissingDependencyError(f"onnxruntime has no CUDA execution provider here: {GPU_HINT}")
            print(f"note: a CUDA GPU is present but this onnxruntime has no CUDA provider, so the bundle runs on the "
                  f"CPU; for the GPU: {GPU_HINT}", file=sys.stderr)
            want_cuda = False
        providers: list[Any] = ["CPUExecutionProvider"]
        if want_cuda:
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.specs = bundle.graphs
        self.sessions: dict[str, Any] = {}
        for name in self.specs:
            try:
                self.sessions[name] = ort.InferenceSession(str(bundle.path(name)), opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise BundleError(f"cannot load {bundle.path(name)}: {str(exc).splitlines()[0]}") from None
        ran = self.sessions["unet"].get_providers()[0]
        self.on_cuda = ran == "CUDAExecutionProvider"
        if want_cuda and not self.on_cuda:
            raise BundleError(f"onnxruntime did not start the CUDA provider (ran {ran}); check CUDA/cuDNN: {GPU_HINT}")
        self.device = ran
        self.torch_device = torch.device("cuda") if self.on_cuda else torch.device("cpu")
        self.resolution = int(m["resolution"])
        self.latent_shape = tuple(m["latent_shape"])
        self.alphas_cumprod = torch.from_numpy(bundle.alphas_cumprod())
        self.prediction_type = m["backbone"]["prediction_type"]
        self.max_tokens = int(m["max_tokens"])
        self.has_noise = "noise" in self.sessions
        self.tokenizer = CLIPTokenizer.from_pretrained(bundle.root / "tokenizer")

    def run(self, name: str, **inputs: torch.Tensor) -> list[np.ndarray]:
        """Run one graph on torch inputs; outputs as numpy (CPU) — the generic path used by validation and CPU."""
        spec = self.specs[name]
        if self.on_cuda:
            return [o.cpu().numpy() for o in self._run_cuda(name, inputs)]
        feed = {t.name: inputs[t.name].detach().cpu().numpy().astype(_NP[t.dtype], copy=False) for t in spec.inputs}
        return self.sessions[name].run([t.name for t in spec.outputs], feed)

    def _run_cuda(self, name: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """IO binding on CUDA torch tensors: inputs bound in place, outputs written into preallocated tensors.
        Not run here (no GPU with onnxruntime-gpu in this project's CI)."""
        spec = self.specs[name]
        binding = self.sessions[name].io_binding()
        keep = []
        batch = next(iter(inputs.values())).shape[0]
        for t in spec.inputs:
            x = inputs[t.name].to(self.torch_device, _TORCH[t.dtype]).contiguous()
            keep.append(x)
            binding.bind_input(t.name, "cuda", 0, _NP[t.dtype], tuple(x.shape), x.data_ptr())
        outs = []
        for t in spec.outputs:
            y = torch.empty(t.concrete(batch), dtype=_TORCH[t.dtype], device=self.torch_device)
            outs.append(y)
            binding.bind_output(t.name, "cuda", 0, _NP[t.dtype], tuple(y.shape), y.data_ptr())
        binding.synchronize_inputs()  # torch wrote the inputs on its own stream
        self.sessions[name].run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs

    def _call(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return self._run_cuda(name, inputs)[0].float()
        return torch.from_numpy(self.run(name, **inputs)[0]).float()

    def synchronize(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()
