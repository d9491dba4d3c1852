"""The torch backend: the very modules that training runs and `export` traces (`noop_rt/train/graph_modules.py`),
eager, fp32 or fp16, CPU or CUDA, behind the same runner contract as the engines. It is the only runtime module that
reaches the torch side (backbone, checkpoint, NoOp), and `runtime/opener.py` imports it only when it is chosen. It runs
checkpoints and diffusers folders, and robust mode (which takes gradients through the model).

On CUDA, `cuda_graph=True` (or NOOP_RT_TORCH_CUDA_GRAPH=1) replays the NoOp classifier module from CUDA graphs, one
per batch shape (`torch_cuda_graph.CudaGraphed`), fp32 or fp16; off by default until measured on a GPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noop_rt.demo import model_name
from noop_rt.runtime.backends.base import GraphRunner, env_flag
from noop_rt.runtime.backends.torch_cuda_graph import Capture, CudaGraphed
from noop_rt.runtime.bundle import sha256_file
from noop_rt.runtime.graph_model import ModelInfo, default_preprocessing
from noop_rt.runtime.graph_specs import CLASSIFIER, GraphSpec
from noop_rt.train.backbones import DEMO_SOURCE, Backbone, load_backbone, pick_device
from noop_rt.train.checkpoint import NoopCheckpoint, backbone_fingerprint, checkpoint_backbone, load_checkpoint
from noop_rt.train.graph_modules import backbone_specs, graph_modules

CUDA_GRAPH_ENV = "NOOP_RT_TORCH_CUDA_GRAPH"  # 1: the classifier module through CUDA graphs (CUDA only; default off)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (a Ray actor gets its share of the cores); None leaves torch's default."""
    if threads:
        torch.set_num_threads(threads)


class TorchRunner(GraphRunner):
    name = "torch"

    def __init__(self, backbone: Backbone, ckpt: NoopCheckpoint | None, fp16: bool = False, *,
                 cuda_graph: bool | None = None, capture: Capture | None = None) -> None:
        """`cuda_graph`: the classifier module through CUDA graphs when the device is CUDA (None:
        NOOP_RT_TORCH_CUDA_GRAPH, default off). `capture`: another capture function (`static_eager` runs the same
        static-buffer path on any device; the CPU tests use it)."""
        self.backbone = backbone
        self.ckpt = ckpt
        self.modules = graph_modules(backbone, ckpt, half=fp16, copy=False)  # fp16: UNet + noise halved in place
        self.specs = backbone_specs(backbone)
        self.device = str(backbone.device)
        want = env_flag(CUDA_GRAPH_ENV, False) if cuda_graph is None else cuda_graph
        self.graphed: CudaGraphed | None = None
        if CLASSIFIER in self.modules and (capture is not None or (want and backbone.device.type == "cuda")):
            self.graphed = CudaGraphed(self.modules[CLASSIFIER], capture=capture)
        self._default_emb = None if ckpt is None else ckpt.class_embeddings.to(backbone.device, torch.float32)
        self._fed: tuple[np.ndarray, torch.Tensor] | None = None  # the last class embeddings fed, and on the device

    def has(self, graph: str) -> bool:
        return graph in self.modules

    def _tensor(self, name: str, array: np.ndarray) -> torch.Tensor:
        if name == "class_embeddings":  # fed on every call: upload once per array
            if self._fed is None or self._fed[0] is not array:  # holds the array: its id cannot be reused
                self._fed = (array, torch.from_numpy(np.ascontiguousarray(array)).to(self.backbone.device))
            return self._fed[1]
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.backbone.device)

    def graph_spec(self, graph: str) -> GraphSpec | None:
        return self.specs.get(graph)

    @torch.no_grad()
    def _run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        spec = self.specs[graph]  # `run` checked the feeds; the classifier's class embeddings may be left out
        args = [self._tensor(t.name, feeds[t.name]) if t.name in feeds else self._default_emb for t in spec.inputs]
        module = self.graphed if graph == CLASSIFIER and self.graphed is not None else self.modules[graph]
        result = module(*args)
        result = result if isinstance(result, tuple) else (result,)
        names = [o.name for o in spec.outputs] if graph != CLASSIFIER else ["errors", "probs"]
        by_name = dict(zip(names, result, strict=False))
        return [by_name[o].float().cpu().numpy() if by_name[o].is_floating_point() else by_name[o].cpu().numpy()
                for o in outputs]

    def purify(self, images: np.ndarray, config: Any) -> np.ndarray:
        """RDC likelihood maximisation (robust.py) on images (B, 3, H, W)."""
        from noop_rt.train.robust import likelihood_maximisation

        return likelihood_maximisation(self.backbone, torch.from_numpy(images), config).cpu().numpy()

    def unet_gflop(self) -> float | None:
        return self.backbone.unet_gflop()

    def synchronize(self) -> None:
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize(self.backbone.device)

    def close(self) -> None:
        if self.graphed is not None:
            self.graphed.clear()
            self.graphed = None
        self.modules.clear()


def tokenizer_of(backbone: Backbone):
    def tokenize(prompts: list[str]) -> np.ndarray:
        return backbone.tokenize(prompts).numpy().astype(np.int64)

    return tokenize


def open_checkpoint(path: Path, model: str | None, device: str, fp16: bool, max_batch: int,
                    lora: Path | None = None, lora_scale: float | None = None
                    ) -> tuple[TorchRunner, ModelInfo, np.ndarray]:
    """A NoOp checkpoint on its backbone (or `model`, which must be the same network), with the LoRA it was trained
    with (its recorded file, or `lora`)."""
    ckpt = load_checkpoint(path)
    backbone = checkpoint_backbone(ckpt, path, model, lora, lora_scale, device=pick_device(device))  # fp16: see
    # TorchRunner
    name = model_name(path)
    info = ModelInfo(name=name, source="checkpoint", location=str(path), resolution=backbone.resolution,
                     latent_shape=backbone.latent_shape, num_train_timesteps=backbone.num_train_timesteps,
                     prediction_type=backbone.prediction_type, max_batch=max_batch, fingerprint=sha256_file(path)[:16],
                     classes=list(ckpt.classes), prompts=list(ckpt.prompts), template=ckpt.template,
                     t_star=ckpt.t_star, tau=ckpt.tau, loss=ckpt.loss, prompt_tuned=ckpt.prompt_ctx is not None,
                     precision="fp16" if fp16 else "fp32", preprocessing=default_preprocessing(backbone.resolution),
                     drift=ckpt.train.get("drift"), cascade=ckpt.train.get("cascade"))
    return TorchRunner(backbone, ckpt, fp16), info, ckpt.class_embeddings.float().numpy()


def open_diffusers(folder: str, device: str, fp16: bool, max_batch: int, lora: Path | None = None,
                   lora_scale: float | None = None) -> tuple[TorchRunner, ModelInfo]:
    """A diffusers Stable Diffusion folder (or the demo backbone) for the zero-shot strategies, with `lora` fused."""
    backbone = load_backbone(folder, device=pick_device(device), lora=lora,
                             lora_scale=1.0 if lora_scale is None else lora_scale)  # fp16: see TorchRunner
    fingerprint = hashlib.sha256(json.dumps(backbone_fingerprint(backbone), sort_keys=True).encode()).hexdigest()
    name = "demo" if backbone.source == DEMO_SOURCE else Path(backbone.source).name
    info = ModelInfo(name=name, source="diffusers", location=backbone.source, resolution=backbone.resolution,
                     latent_shape=backbone.latent_shape, num_train_timesteps=backbone.num_train_timesteps,
                     prediction_type=backbone.prediction_type, max_batch=max_batch, fingerprint=fingerprint[:16],
                     precision="fp16" if fp16 else "fp32", preprocessing=default_preprocessing(backbone.resolution))
    return TorchRunner(backbone, None, fp16), info
