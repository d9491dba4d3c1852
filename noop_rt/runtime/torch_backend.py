"""The PyTorch backend: the diffusers/transformers modules themselves (eager), fp32 or fp16, CPU or CUDA."""

from __future__ import annotations

import torch

from noop_rt.backbone import Backbone
from noop_rt.errors import BadInputError
from noop_rt.noop import NoiseModel
from noop_rt.robust import RobustConfig, likelihood_maximisation


class TorchBackend:
    name = "torch"

    def __init__(self, backbone: Backbone, noise_model: NoiseModel | None = None) -> None:
        self.backbone = backbone
        self.noise_model = None if noise_model is None else noise_model.to(backbone.device).eval()
        self.device = str(backbone.device)
        self.torch_device = backbone.device
        self.resolution = backbone.resolution
        self.latent_shape = backbone.latent_shape
        self.alphas_cumprod = backbone.alphas_cumprod
        self.has_noise = noise_model is not None

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(images)

    @torch.no_grad()
    def noise(self, z0: torch.Tensor) -> torch.Tensor:
        if self.noise_model is None:
            raise BadInputError("method 'noop' needs a learned noise: pass --ckpt NAME.pt or --bundle DIR")
        return self.noise_model(z0.to(self.backbone.device)).float()

    @torch.no_grad()
    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.backbone.predict_eps(z_t, t, emb)

    def purify(self, images: torch.Tensor, config: RobustConfig) -> torch.Tensor:
        """RDC likelihood maximisation (see robust.py)."""
        return likelihood_maximisation(self.backbone, images, config)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        return self.backbone.embed(prompts)

    def synchronize(self) -> None:
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize(self.backbone.device)
