"""NoOp: a learned dataset noise eps_D (frequency matching) plus a meta-network offset g_phi(z0) (spatial matching).

eps(x) = eps_D + g_phi(z0(x)) replaces random noise, so ONE (t*, eps) pair per image classifies. Training keeps the
diffusion model frozen and minimises cross-entropy over logits -s * zscore(err_c(t*, eps(x))) on a few-shot set.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from noop_rt.runtime.images import load_image
from noop_rt.train.backbones import Backbone
from noop_rt.train.calibration import fit_temperature
from noop_rt.train.diffusion_error import class_errors


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> SiLU, twice. GroupNorm behaves the same in training, inference and ONNX."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class MetaNetConfig:
    """A small UNet on the clean latent z0 (as the NoOp authors' code): channels per level, 2x down per level."""

    in_channels: int
    channels: tuple[int, ...] = (32, 64, 128)


class MetaNet(nn.Module):
    """g_phi: z0 (B, c, h, w) -> noise offset (B, c, h, w); the 1x1 output conv is zero-initialised,
    so training starts exactly at eps_D."""

    def __init__(self, config: MetaNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        self.stem = ConvBlock(config.in_channels, ch[0])
        self.down = nn.ModuleList([nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1) for i in range(len(ch) - 1)])
        self.enc = nn.ModuleList([ConvBlock(ch[i], ch[i + 1]) for i in range(len(ch) - 1)])
        self.up = nn.ModuleList([nn.Conv2d(ch[i + 1], ch[i], 3, padding=1) for i in reversed(range(len(ch) - 1))])
        self.dec = nn.ModuleList([ConvBlock(2 * ch[i], ch[i]) for i in reversed(range(len(ch) - 1))])
        self.out = nn.Conv2d(ch[0], config.in_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        h = self.stem(z0)
        skips = [h]
        for down, enc in zip(self.down, self.enc, strict=True):
            h = enc(down(h))
            skips.append(h)
        skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            skip = skips.pop()
            h = dec(torch.cat([skip, up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))], dim=1))
        return self.out(h)


class NoiseModel(nn.Module):
    """eps(z0) = eps_D + g_phi(z0): the noise NoOp uses in place of a random draw. (B, c, h, w)"""

    def __init__(self, eps_d: torch.Tensor, meta_net: MetaNet | None) -> None:
        super().__init__()
        self.eps_d = nn.Parameter(eps_d.clone())  # (c, h, w)
        self.meta_net = meta_net

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        eps = self.eps_d.unsqueeze(0).expand(z0.shape[0], *self.eps_d.shape)
        return eps + self.meta_net(z0) if self.meta_net is not None else eps.contiguous()


class PromptContext(nn.Module):
    """CoOp-style prompt tuning: the embeddings of the template's prefix tokens (positions 1..M, shared by all
    classes) become learnable; initialised to the template's own token embeddings, so training starts at the
    plain prompt. Applied with a forward hook on the text encoder's token embedding."""

    def __init__(self, backbone: Backbone, prompts: list[str], template: str) -> None:
        super().__init__()
        if backbone.family != "sd":
            from noop_rt.runtime.errors import BadInputError

            raise BadInputError(f"--prompt-tuning is supported on SD 1.x/2.x backbones, not on {backbone.family}")
        prefix = template.split("{}")[0].strip()
        if not prefix:
            raise ValueError("prompt tuning needs a template with words before '{}' (e.g. 'a photo of a {}')")
        prefix_ids = backbone.tokenizer(prefix, add_special_tokens=False).input_ids
        self.ids = backbone.tokenize(prompts)  # (C, L)
        if not torch.equal(self.ids[:, 1:1 + len(prefix_ids)], torch.tensor(prefix_ids).expand(len(prompts), -1)):
            raise ValueError(f"the template prefix {prefix!r} does not tokenize identically in every prompt")
        table = backbone.text_encoder.get_input_embeddings()
        self.ctx = nn.Parameter(table.weight[torch.tensor(prefix_ids)].detach().float().clone())  # (M, D)
        self._table = table

    def embed(self, backbone: Backbone) -> torch.Tensor:
        """Class embeddings (C, L, D) with the learnable context in place; differentiable w.r.t. `ctx`."""
        m = self.ctx.shape[0]

        def replace(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return torch.cat([output[:, :1], self.ctx.to(output.dtype).expand(output.shape[0], -1, -1),
                              output[:, 1 + m:]], dim=1)

        handle = self._table.register_forward_hook(replace)
        try:
            return backbone.text_encoder(self.ids.to(backbone.device))[0].float()
        finally:
            handle.remove()


@dataclass
class TrainConfig:
    """NoOp training options (defaults tuned on the demo; the authors' reference values noted inline)."""

    t_star: int = 500  # the authors' t*
    epochs: int = 20  # authors ~20
    batch_size: int = 16
    lr_noise: float = 1e-2  # authors: Adam 1e-2 for eps_D
    lr_meta: float = 1e-3  # authors: 1e-3 for the meta-net
    lr_prompt: float = 1e-3
    weight_decay: float = 0.0
    meta_net: bool = True
    meta_channels: tuple[int, ...] = (32, 64, 128)
    prompt_tuning: bool = False
    negatives: int = 10  # classes scored per image per step: the true one + (K-1) random others (authors 10-15)
    logit_scale: float = 5.0  # logits = -scale * zscore(errors over the K scored classes)
    loss: str = "l1"  # the error norm of err_c: l1 as the NoOp code and Li et al. (Pets: 87.3 vs 86.3 for l2)
    seed: int = 0
    max_batch: int = 256  # UNet batch chunk
    gradient_checkpointing: bool = False  # for SD-size UNets on a 24 GB GPU
    fit_cascade: bool = True  # fit --method cascade's defaults on the validation split (train/cascade_fit.py)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["meta_channels"] = list(self.meta_channels)
        return out


@dataclass
class TrainResult:
    noise: NoiseModel
    prompt: PromptContext | None
    class_embeddings: torch.Tensor  # (C, L, D) used for classification (prompt-tuned if enabled)
    tau: float  # fitted on the validation errors (temperature scaling)
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    val_accuracy: float = float("nan")
    minutes: float = 0.0
    interrupted_in_epoch: int | None = None  # Ctrl-C stopped training in this epoch; the best epoch before is kept


def zscore(errors: torch.Tensor) -> torch.Tensor:
    """Standardise errors before the softmax, as the NoOp code does: centred per row (over the scored classes),
    divided by the batch's mean row std, detached. Dividing each row by its own std (the reference code) makes the
    logits of a 2-class row constant (+-0.71) and kills the gradient; a shared, detached scale keeps the logits
    scale-free without that."""
    centred = errors - errors.mean(dim=1, keepdim=True)
    return centred / errors.std(dim=1).mean().detach().clamp(min=1e-8)


def sample_classes(labels: torch.Tensor, num_classes: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, K) class indices per image: the true class first, then K-1 distinct random others (all if C <= K)."""
    if num_classes <= k:
        rows = [torch.cat([y.view(1), torch.tensor([c for c in range(num_classes) if c != y])]) for y in labels]
        return torch.stack(rows)
    rows = []
    for y in labels.tolist():
        others = torch.tensor([c for c in range(num_classes) if c != y])
        pick = others[torch.randperm(len(others), generator=generator)[:k - 1]]
        rows.append(torch.cat([torch.tensor([y]), pick]))
    return torch.stack(rows)


@torch.no_grad()
def evaluate_noise(backbone: Backbone, noise: NoiseModel, emb: torch.Tensor, z0: torch.Tensor,
                   labels: torch.Tensor, t_star: int, loss: str, max_batch: int,
                   progress: Callable[[int], None] | None = None) -> tuple[float, torch.Tensor]:
    """(accuracy, errors (N, C) on the CPU) of the single-pass NoOp classifier on cached latents (on any device:
    each chunk moves to the backbone's device); `progress(n)` after each chunk of n images."""
    module = backbone.class_errors((loss,))
    emb = emb.to(backbone.device)
    errors = []
    for start in range(0, len(z0), 64):
        z = z0[start:start + 64].to(backbone.device)
        t = torch.full((len(z),), float(t_star), device=backbone.device)
        errors.append(class_errors(module, z, noise(z).float(), t, emb, max_batch).cpu())
        if progress is not None:
            progress(len(z))
    err = torch.cat(errors)
    return float((err.argmin(dim=1) == labels.cpu()).float().mean()), err


@torch.no_grad()
def encode_paths(backbone: Backbone, paths: Sequence[str | Path], chunk: int = 16,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """z0 of every image file, computed once (the encoder is frozen, training never re-encodes). (N, c, h, w)"""
    out = []
    for i in range(0, len(paths), chunk):
        batch = torch.stack([torch.from_numpy(load_image(p, backbone.resolution)) for p in paths[i:i + chunk]])
        out.append(backbone.encode(batch).cpu())
        if progress is not None:
            progress(len(batch))
    return torch.cat(out)


def loss_and_backward(backbone: Backbone, noise: NoiseModel, class_embeddings: Callable[[], torch.Tensor],
                      z0: torch.Tensor, cls: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The NoOp loss of one batch (true class at column 0 of `cls` (B, K)), its gradients accumulated into the
    noise (and prompt) parameters; returns the loss (detached).

    When the B*K UNet evaluations fit in `config.max_batch`, one pass with autograd. Otherwise an exact two-pass
    gradient whose memory is one chunk's graph, not the batch's: (1) all errors without a graph, dL/d(errors) from
    the loss on that small (B, K) tensor; (2) per chunk of at most max_batch evaluations, recompute its errors with a
    graph and backpropagate sum(errors * dL/d(errors)). The loss depends on the parameters only through the errors
    and the meta-net is per-image (GroupNorm), so this equals the one-pass gradient (tested). With
    `--gradient-checkpointing` this is what lets SD-1.5 train at `--max-batch 1` or 2."""
    b, k = cls.shape
    target = torch.zeros(b, dtype=torch.long)
    module = backbone.class_errors((config.loss,))

    def errors_of(z: torch.Tensor, eps: torch.Tensor, emb: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B', K') errors of each image's own classes: emb (C, L, D) gathered per row to (B', K', L, D)."""
        t = torch.full((len(z),), float(config.t_star), device=z.device)
        per_row = emb[classes.to(emb.device)]
        return class_errors(module, z, eps[:, 0], t, per_row, config.max_batch)

    def loss_of(errors: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(-config.logit_scale * zscore(errors), target.to(errors.device))

    if b * k <= config.max_batch:
        loss = loss_of(errors_of(z0, noise(z0).unsqueeze(1), class_embeddings(), cls))
        loss.backward()
        return loss.detach()
    with torch.no_grad():
        errors = errors_of(z0, noise(z0).unsqueeze(1), class_embeddings(), cls)
    errors.requires_grad_(True)
    loss = loss_of(errors)
    (grad,) = torch.autograd.grad(loss, errors)
    rows, cols = max(1, config.max_batch // k), min(k, config.max_batch)
    for i in range(0, b, rows):
        z = z0[i:i + rows]
        # The UNet chunks start from detached copies of the noise and embeddings, so each chunk's graph is freed by
        # its own backward; the gradients gathered on the copies then flow into the noise/prompt graphs once.
        roots = [(x, x.detach().requires_grad_(x.requires_grad)) for x in (noise(z).unsqueeze(1), class_embeddings())]
        (_, eps_in), (_, emb_in) = roots
        for j in range(0, k, cols):
            part = errors_of(z, eps_in, emb_in, cls[i:i + rows, j:j + cols])
            (part * grad[i:i + rows, j:j + cols].to(part.device)).sum().backward()
            del part
        live = [(x, x_in.grad) for x, x_in in roots if x.requires_grad and x_in.grad is not None]
        if live:
            torch.autograd.backward([x for x, _ in live], [g for _, g in live])
    return loss.detach()


def train_noop(
    backbone: Backbone, prompts: list[str], template: str, z_train: torch.Tensor, train_labels: torch.Tensor,
    z_val: torch.Tensor, val_labels: torch.Tensor, config: TrainConfig,
    on_step: Callable[[dict], None] | None = None, on_validate: Callable[[int], None] | None = None,
) -> TrainResult:
    """Learn eps_D (+ meta-net, + prompt context) from cached clean latents z0 (N, c, h, w) and labels; select the
    epoch with the best validation accuracy (ties: lower validation loss); fit tau on the validation errors.
    Deterministic for a seed. `on_step` gets each step's record (with its `images`) and each epoch's validation
    record; `on_validate(n)` follows the validation passes image by image. Ctrl-C after the first epoch stops
    training and keeps the best epoch so far (`interrupted_in_epoch` says where); before it, it propagates."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start_time = time.time()
    backbone.requires_grad_(False)
    if config.gradient_checkpointing and hasattr(backbone.unet, "enable_gradient_checkpointing"):
        backbone.unet.enable_gradient_checkpointing()
    device = backbone.device
    num_classes = len(prompts)
    shape = backbone.latent_shape
    eps_d = torch.randn(shape, generator=generator)
    meta = MetaNet(MetaNetConfig(shape[0], tuple(config.meta_channels))) if config.meta_net else None
    noise = NoiseModel(eps_d, meta).to(device)
    prompt = PromptContext(backbone, prompts, template).to(device) if config.prompt_tuning else None
    groups: list[dict] = [{"params": [noise.eps_d], "lr": config.lr_noise}]
    if meta is not None:
        groups.append({"params": list(meta.parameters()), "lr": config.lr_meta})
    if prompt is not None:
        groups.append({"params": [prompt.ctx], "lr": config.lr_prompt})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    fixed_emb = backbone.embed(prompts)

    def class_embeddings() -> torch.Tensor:
        return prompt.embed(backbone) if prompt is not None else fixed_emb

    steps_per_epoch = math.ceil(len(z_train) / config.batch_size)
    best: tuple[float, float] = (-1.0, float("inf"))
    best_state: dict = {}
    history: list[dict] = []
    interrupted = None
    for epoch in range(config.epochs):
        try:
            noise.train()
            order = torch.randperm(len(z_train), generator=generator)
            epoch_loss = 0.0
            for step in range(steps_per_epoch):
                pick = order[step * config.batch_size:(step + 1) * config.batch_size]
                z0, y = z_train[pick].to(device), train_labels[pick]
                cls = sample_classes(y, num_classes, config.negatives, generator)  # (B, K), true class at 0
                optimizer.zero_grad(set_to_none=True)
                loss = loss_and_backward(backbone, noise, class_embeddings, z0, cls, config)
                optimizer.step()
                epoch_loss += loss.item() * len(pick)
                if on_step is not None:
                    on_step({"epoch": epoch + 1, "loss": loss.item(), "images": len(pick)})
            noise.eval()
            with torch.no_grad():
                emb = class_embeddings()
            val_acc, val_err = evaluate_noise(backbone, noise, emb, z_val, val_labels, config.t_star, config.loss,
                                              config.max_batch, on_validate)
            val_loss = float(F.cross_entropy(-config.logit_scale * zscore(val_err), val_labels))
            record = {"epoch": epoch + 1, "train_loss": epoch_loss / len(z_train), "val_accuracy": val_acc,
                      "val_loss": val_loss}
            history.append(record)
            if on_step is not None:
                on_step(record)
            if (val_acc, -val_loss) > (best[0], -best[1]):
                best = (val_acc, val_loss)
                best_state = {"noise": copy.deepcopy(noise.state_dict()),
                              "prompt": copy.deepcopy(prompt.state_dict()) if prompt is not None else None,
                              "epoch": epoch + 1}
        except KeyboardInterrupt:
            if not best_state:  # not one epoch finished: nothing to keep
                raise
            interrupted = epoch + 1
            break
    noise.load_state_dict(best_state["noise"])
    if prompt is not None:
        prompt.load_state_dict(best_state["prompt"])
    noise.eval()
    with torch.no_grad():
        emb = class_embeddings().detach()
    val_acc, val_err = evaluate_noise(backbone, noise, emb, z_val, val_labels, config.t_star, config.loss,
                                      config.max_batch, on_validate)
    tau = fit_temperature(val_err, val_labels)
    return TrainResult(noise=noise, prompt=prompt, class_embeddings=emb.cpu(), tau=tau, history=history,
                       best_epoch=best_state["epoch"], val_accuracy=val_acc,
                       minutes=(time.time() - start_time) / 60, interrupted_in_epoch=interrupted)


def random_noise_model(shape: Sequence[int], seed: int) -> NoiseModel:
    """A single random noise N(0, I) as a NoiseModel (no meta-net): the 'random single noise' reference."""
    return NoiseModel(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)), None)
