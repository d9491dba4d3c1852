"""The backend interface: the four graphs a diffusion classifier runs (encoder, noise, UNet, text encoder)."""

from __future__ import annotations

from typing import Protocol

import torch

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


class Backend(Protocol):
    """What the classifier needs from a runtime. Tensors are torch tensors (CPU or CUDA); the error math is fp32."""

    name: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # where it actually runs, e.g. "cpu", "cuda:0", "CUDAExecutionProvider"
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
