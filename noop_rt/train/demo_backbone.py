"""Train the built-in demo backbone: `python -m noop_rt.train.demo_backbone [--steps 4000] [--out DIR]`.

A text-conditioned pixel-space diffusion model with Stable Diffusion's component classes: a diffusers
UNet2DConditionModel with cross-attention on a small transformers CLIPTextModel (trained jointly, tokenizer
built offline), DDPM schedule (1000 steps, linear betas, eps-prediction). 10 % of prompts are dropped to the empty
prompt so an unconditional path exists (robust mode). Data: the `train` split of `noop_rt.demo.digits`, +-1 px
random shifts. AdamW 3e-4, batch 64, EMA 0.999 of the weights; the EMA weights are saved (fp16 on disk).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from noop_rt.demo import DEMO_TEMPLATE, DIGIT_NAMES, MODEL_DIR
from noop_rt.demo.digits import digit_images, split_indices
from noop_rt.train.architectures import DEMO, Components, random_components, save_components


def shift_one_pixel(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random +-1 px translation per image, filling with the background value (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(steps: int, batch: int, lr: float, seed: int, out: Path, prompt_dropout: float = 0.1) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digit_images()
    train_idx = split_indices(labels)["train"]
    x_all = torch.from_numpy(images[train_idx]).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 16, 16)
    y_all = torch.from_numpy(labels[train_idx])

    parts = random_components(DEMO, seed=seed)
    unet, text_encoder, tokenizer = parts.unet, parts.text_encoder, parts.tokenizer
    prompts = [DEMO_TEMPLATE.format(name) for name in DIGIT_NAMES] + [""]  # index 10 = empty prompt
    ids = tokenizer(prompts, padding="max_length", max_length=DEMO.max_tokens, truncation=True,
                    return_tensors="pt").input_ids  # (11, L)
    abar = parts.scheduler.alphas_cumprod.float()  # (1000,)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)

    start = time.time()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="train demo backbone", unit="step")
    for step in bar:
        pick = torch.randint(0, len(x_all), (batch,), generator=generator)
        x0 = shift_one_pixel(x_all[pick], generator)
        y = y_all[pick].clone()
        y[torch.rand(batch, generator=generator) < prompt_dropout] = len(DIGIT_NAMES)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        emb = text_encoder(ids[y])[0]  # (B, L, D)
        loss = F.mse_loss(unet(x_t, t, emb).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")

    minutes = (time.time() - start) / 60
    final = Components(unet=ema_unet.half(), text_encoder=ema_text.half(), tokenizer=tokenizer, vae=None,
                       scheduler=parts.scheduler)
    tmp = out.with_name(out.name + ".tmp")
    save_components(final, str(tmp))
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "prompt_dropout": prompt_dropout,
              "train_images": len(x_all), "minutes": round(minutes, 1), "torch_threads": torch.get_num_threads(),
              "final_loss_100": sum(losses[-100:]) / 100, "template": DEMO_TEMPLATE, "classes": list(DIGIT_NAMES),
              "unet_params": sum(p.numel() for p in unet.parameters()),
              "text_encoder_params": sum(p.numel() for p in text_encoder.parameters())}
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    args = parser.parse_args()
    print(json.dumps(train(args.steps, args.batch, args.lr, args.seed, args.out), indent=2))


if __name__ == "__main__":
    main()
