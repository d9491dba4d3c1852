"""The backend interface: the four graphs a diffusion classifier runs (encoder, noise, UNet, text encoder)."""

from __future__ import annotations

from typing import Protocol

import torch

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


class Backend(Protocol):
    """What the classifier needs from a runtime. Tensors are torch tensors (CPU or CUDA); the error math is fp32."""

    name: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # where it actually runs, e.g. "cpu", "cuda:0", "CUDAExecutionProvider"
    torch_device: torch.device  # where its output tensors live (class embeddings are uploaded there once)
    resolution: int  # input image side in pixels
    latent_shape: tuple[int, int, int]  # (c, h, w) of z0
    alphas_cumprod: torch.Tensor  # (T,) float32, CPU
    has_noise: bool  # a learned NoOp noise is available

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) in [-1, 1] -> z0 (B, c, h, w) float32."""
        ...

    def noise(self, z0: torch.Tensor) -> torch.Tensor:
        """z0 -> eps_D + g_phi(z0) (B, c, h, w) float32."""
        ...

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w), (N,) float, (N, L, D) -> eps_hat (N, c, h, w) float32."""
        ...

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings (C, L, D) float32."""
        ...

    def synchronize(self) -> None:
        """Block until queued device work is done (timers are synchronised on GPU)."""
        ...


class GraphBackend:
    """The four Backend methods for runtimes that execute a bundle's graphs by name (onnxruntime, TensorRT):
    subclasses implement `_call(graph, **inputs) -> float32 tensor` and set the manifest-derived attributes."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    max_tokens: int
    tokenizer: object

    def _call(self, graph: str, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._call("vae_encoder", image=images)

    def noise(self, z0: torch.Tensor) -> torch.Tensor:
        return self._call("noise", z0=z0)

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        from noop_rt.backbone import v_to_eps

        out = self._call("unet", sample=z_t, timestep=t.float(), encoder_hidden_states=emb)
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod.to(out.device)[t.long().to(out.device)]
            out = v_to_eps(out, z_t.to(out.device).float(), abar)
        return out

    def embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids
        return self._call("text_encoder", input_ids=ids)
