"""From an image-folder tree to a NoOp checkpoint: few-shot split, cached latents, training, calibration."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from noop_rt.runtime.classes import ImageFolder, make_prompts
from noop_rt.runtime.errors import BadInputError
from noop_rt.train.backbones import Backbone
from noop_rt.train.cascade_fit import FIT_IMAGES, fit_cascade
from noop_rt.train.checkpoint import NoopCheckpoint, backbone_fingerprint
from noop_rt.train.noop import TrainConfig, TrainResult, encode_paths, train_noop


@dataclass
class FewShotSplit:
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    source: str  # how the split was made, for the training record


def fewshot_split(data: str | Path, shots: int, val_shots: int, seed: int) -> FewShotSplit:
    """`DIR/train` + `DIR/val` when both exist (shots per class from train, all of val), else `shots` per class
    from DIR for training and up to `val_shots` per class of the rest for validation (seeded)."""
    root = Path(data).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_set, val_set = ImageFolder.scan(root / "train"), ImageFolder.scan(root / "val")
        if train_set.classes != val_set.classes:
            raise BadInputError(f"{root}/train and {root}/val have different class folders")
        train, _ = train_set.per_class(shots, seed)
        val = val_set.samples
        source = f"{shots} shots/class from {root / 'train'}, validation {root / 'val'}"
        classes = train_set.classes
    else:
        dataset = ImageFolder.scan(root)
        train, rest = dataset.per_class(shots, seed)
        val = []
        for label in range(len(dataset.classes)):
            val += [s for s in rest if s[1] == label][:val_shots]
        source = f"{shots} shots/class + up to {val_shots} validation/class from {root} (seed {seed})"
        classes = dataset.classes
    counts = torch.bincount(torch.tensor([label for _, label in train]), minlength=len(classes))
    short = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if short:
        raise BadInputError(f"no training images for class(es): {', '.join(short[:5])}")
    if not val:
        raise BadInputError(f"no validation images: add {root}/val/<class>/ or more than --shots {shots} images "
                            "per class")
    if len(classes) < 2:
        raise BadInputError("a classifier needs at least two classes")
    return FewShotSplit(classes, train, val, source)


def encode_split(backbone: Backbone, split: FewShotSplit, show_progress: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean latents and labels of the training and validation images: (z_train, y_train, z_val, y_val)."""
    paths = [p for p, _ in split.train] + [p for p, _ in split.val]
    with tqdm(total=len(paths), desc="encode images", unit="img", file=sys.stderr, disable=not show_progress) as bar:
        z = encode_paths(backbone, paths, progress=bar.update)
    return (z[:len(split.train)], torch.tensor([label for _, label in split.train]),
            z[len(split.train):], torch.tensor([label for _, label in split.val]))


def train_checkpoint(backbone: Backbone, split: FewShotSplit, template: str, config: TrainConfig,
                     show_progress: bool = True, prompts_table: dict[str, str] | None = None
                     ) -> tuple[NoopCheckpoint, TrainResult]:
    """Encode the split once, train NoOp with a progress bar, and assemble the checkpoint (not yet written).
    `prompts_table` ({class: prompt}, e.g. Li et al.'s prompt files) replaces the template's prompts."""
    if prompts_table is not None:
        missing = [c for c in split.classes if c not in prompts_table]
        if missing:
            raise BadInputError(f"the prompts file has no prompt for class(es) {', '.join(missing[:5])}")
        if config.prompt_tuning:
            raise BadInputError("--prompt-tuning learns the template's context words: use --template, not --prompts")
        prompts = [prompts_table[c] for c in split.classes]
    else:
        prompts = make_prompts(split.classes, template)
    z_train, y_train, z_val, y_val = encode_split(backbone, split, show_progress)
    # one bar over every image pass: each epoch's training images and validation images, then the final validation
    # (tau); the ETA holds because validation time is in it
    total = config.epochs * (len(z_train) + len(z_val)) + len(z_val)
    bar = tqdm(total=total, desc="train NoOp", unit="img", file=sys.stderr, disable=not show_progress)

    def on_step(record: dict) -> None:
        if "val_accuracy" in record:
            bar.set_postfix(epoch=record["epoch"], val_acc=f"{record['val_accuracy']:.3f}")
        else:
            bar.update(record["images"])
            bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.3f}")

    result = train_noop(backbone, prompts, template, z_train, y_train, z_val, y_val, config, on_step,
                        on_validate=bar.update)
    bar.close()
    val_errors = validation_errors(backbone, result.noise, result.class_embeddings, z_val, config)
    drift = validation_profile(val_errors, result.tau)
    cascade = None
    if config.fit_cascade:
        print("fit the cascade's threshold on the validation split (pruned and adaptive on up to "
              f"{FIT_IMAGES} images)", file=sys.stderr)
        cascade = fit_cascade(backbone, result.class_embeddings, z_val, y_val, val_errors, result.tau,
                              config.max_batch, config.seed)
    meta = result.noise.meta_net
    ckpt = NoopCheckpoint(
        backbone_source=backbone.source, backbone_fingerprint=backbone_fingerprint(backbone),
        classes=split.classes, prompts=prompts, template=template, t_star=config.t_star, loss=config.loss,
        eps_d=result.noise.eps_d.detach().cpu(),
        meta_net_config=None if meta is None else {"in_channels": meta.config.in_channels,
                                                    "channels": list(meta.config.channels)},
        meta_net_state=None if meta is None else {k: v.detach().cpu() for k, v in meta.state_dict().items()},
        class_embeddings=result.class_embeddings, tau=result.tau,
        prompt_ctx=None if result.prompt is None else result.prompt.ctx.detach().cpu(),
        train={"config": config.to_dict(), "split": split.source, "shots_per_class": _shots(split),
               "train_images": len(split.train), "val_images": len(split.val),
               "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
               "minutes": round(result.minutes, 2), "history": result.history, "drift": drift,
               "cascade": cascade,
               "images": {"train": [str(Path(p).resolve()) for p, _ in split.train],
                          "val": [str(Path(p).resolve()) for p, _ in split.val]}},
    )
    return ckpt, result


def validation_errors(backbone: Backbone, noise: torch.nn.Module, class_embeddings: torch.Tensor,
                      z_val: torch.Tensor, config: TrainConfig) -> np.ndarray:
    """The trained NoOp classifier's errors on the validation split. (N, C) float64"""
    from noop_rt.train.noop import evaluate_noise

    noise.eval()
    _, errors = evaluate_noise(backbone, noise, class_embeddings, z_val, torch.zeros(len(z_val), dtype=torch.long),
                               config.t_star, config.loss, config.max_batch)
    return errors.double().numpy()


def validation_profile(err: np.ndarray, tau: float) -> dict:
    """The validation split's confidence profile for drift warnings (runtime/drift.py): top-1 probabilities with the
    fitted tau and best-class errors of the trained NoOp classifier."""
    from noop_rt.runtime.drift import profile
    from noop_rt.runtime.strategies import softmax

    probs = softmax(-tau * err)
    return profile(probs.max(axis=1), err.min(axis=1), probs.argmax(axis=1), err.shape[1])


def _shots(split: FewShotSplit) -> int:
    return max(torch.bincount(torch.tensor([label for _, label in split.train])).tolist())


def train_command(*, data: Path, out: Path, model: str, shots: int, val_shots: int, timestep: int, meta_net: bool,
                  prompt_tuning: bool, epochs: int, batch_size: int, lr_noise: float, lr_meta: float, negatives: int,
                  loss: str, template: str | None, seed: int, device: str, fp16: bool, gradient_checkpointing: bool,
                  max_batch: int, cli_options: dict[str, str], command: str | None, fit_cascade: bool = True,
                  prompts: dict[str, str] | None = None, lora: Path | None = None, lora_scale: float = 1.0
                  ) -> dict:
    """`noop-rt train`: split, load the backbone, train, write the checkpoint; returns the summary."""
    from noop_rt.demo import DEMO_TEMPLATE
    from noop_rt.runtime.classes import DEFAULT_TEMPLATE
    from noop_rt.train.backbones import DEMO_SOURCE, load_backbone, pick_device
    from noop_rt.train.checkpoint import save_checkpoint

    split = fewshot_split(data, shots, val_shots, seed)
    backbone = load_backbone(model, dtype=torch.float16 if fp16 else torch.float32, device=pick_device(device),
                             lora=lora, lora_scale=lora_scale)
    if not 0 <= timestep < backbone.num_train_timesteps:
        raise BadInputError(f"--timestep must be in [0, {backbone.num_train_timesteps})")
    config = TrainConfig(t_star=timestep, epochs=epochs, batch_size=batch_size, lr_noise=lr_noise, lr_meta=lr_meta,
                         meta_net=meta_net, prompt_tuning=prompt_tuning, negatives=negatives, loss=loss, seed=seed,
                         max_batch=max_batch, gradient_checkpointing=gradient_checkpointing, fit_cascade=fit_cascade)
    tmpl = template or (DEMO_TEMPLATE if backbone.source == DEMO_SOURCE else DEFAULT_TEMPLATE)
    ckpt, result = train_checkpoint(backbone, split, tmpl, config, prompts_table=prompts)
    ckpt.train["options"] = cli_options
    if command is not None:
        ckpt.train["command"] = command
    ckpt.train["torch_threads"] = torch.get_num_threads()
    ckpt.train["device"] = str(backbone.device)
    save_checkpoint(ckpt, out)
    return {"out": str(out), "classes": len(split.classes), "train_images": len(split.train),
            "val_images": len(split.val), "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
            "tau": result.tau, "cascade": ckpt.train.get("cascade"),
            "minutes": round(result.minutes, 2), "interrupted_in_epoch": result.interrupted_in_epoch}
