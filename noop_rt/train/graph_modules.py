"""The torch modules behind each bundle graph (`runtime/graph_specs.py` describes their tensors), built from a backbone
and, for the NoOp graphs, a checkpoint. The torch backend runs exactly these modules and `export` traces them.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from noop_rt.runtime.choices import LOSSES
from noop_rt.runtime.graph_specs import (
    BATCH,
    CLASSES,
    CLASSIFIER,
    ENCODER,
    NOISE,
    PROMPTS,
    SCORER,
    TEXT_ENCODER,
    GraphSpec,
    graph_specs,
)
from noop_rt.train.backbones import Backbone
from noop_rt.train.checkpoint import NoopCheckpoint
from noop_rt.train.diffusion_error import ClassErrors, Float32Graph, NoopClassifier, TextEncoderGraph


def backbone_specs(backbone: Backbone) -> dict[str, GraphSpec]:
    return graph_specs(backbone.latent_shape, backbone.resolution, backbone.max_tokens, backbone.text_dim, LOSSES,
                       token_ids=backbone.token_length)


def graph_modules(backbone: Backbone, ckpt: NoopCheckpoint | None, half: bool = False,
                  copy: bool = True) -> dict[str, nn.Module]:
    """{graph name: module} for a backbone (zero-shot graphs) plus, with a checkpoint, the NoOp graphs.
    `half`: fp16 copies of the UNet and the noise model (the graphs still take and return float32). The VAE encoder
    and the text encoder stay fp32: fp16 Stable Diffusion VAEs are known to overflow (NaN or black outputs), and both
    run once per image or prompt, not once per class. `copy=False` halves the backbone's own UNet in place (the torch
    backend: one UNet in memory), else export gets fp16 copies and keeps the fp32 reference."""
    unet, text, encoder = backbone.unet, backbone.text_conditioner(), backbone.encoder
    noise = ckpt.noise_model().to(backbone.device) if ckpt is not None else None
    if half:
        unet = (deepcopy(unet) if copy else unet).half()
        noise = None if noise is None else deepcopy(noise).half()
    errors = ClassErrors(unet, backbone.schedule, backbone.prediction_type, LOSSES).to(backbone.device)
    modules: dict[str, nn.Module] = {SCORER: errors, ENCODER: Float32Graph(encoder),
                                     TEXT_ENCODER: TextEncoderGraph(text)}
    if ckpt is not None and noise is not None:
        one_loss = ClassErrors(unet, backbone.schedule, backbone.prediction_type, (ckpt.loss,))
        modules[CLASSIFIER] = NoopClassifier(encoder, noise, one_loss.to(backbone.device), ckpt.t_star, ckpt.tau)
        modules[NOISE] = Float32Graph(noise)
    return {name: m.eval() for name, m in modules.items()}


def sample_inputs(spec: GraphSpec, dims: dict[str, int], device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes for tracing; timesteps and token ids in range."""
    out = []
    for t in spec.inputs:
        shape = t.concrete(dims)
        if t.dtype == "int64":
            out.append(torch.zeros(shape, dtype=torch.int64, device=device))
        elif t.name == "timestep":
            out.append(torch.full(shape, 500.0, device=device))
        else:
            out.append(torch.randn(shape, device=device))
    return tuple(out)


TRACE_DIMS = {BATCH: 2, CLASSES: 3, PROMPTS: 2}
