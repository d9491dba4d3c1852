"""Peak memory of NoOp training on the SD-1.5 architecture at batch 1-2 (512 px), per memory option.

    python benchmarks/train_memory.py [--model DIR|demo] [--device auto|cpu|cuda] [--fp16] [--name train_memory]
                                      [--out DIR]
    # writes DIR/NAME.{md,json} (DIR defaults to benchmarks/results)

Each configuration trains one epoch (2 classes, 1 shot + 1 validation image each, 2 classes scored per image)
in a fresh child process: the images are encoded as `noop-rt train` does, then the peak is reset and
`noop.train_noop` (the training loop, validation and tau fit behind `noop-rt train`) runs. Reported per run: the
peak during loading + encoding and the peak during training alone (resident memory, Linux VmHWM, on CPU; torch's
peak allocated/reserved memory on CUDA), and the size of the backbone's weights (UNet + text encoder + VAE), so
that training's peak minus the weights is what the training graph adds. Without `--model`, an SD-1.5-shape
diffusers folder with random weights is built (memory does not depend on the weights). `--model demo` (the 16 px
demo backbone) only proves the script runs end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATE = "a photo of a {}"
CONFIGS = {  # name -> (images per step, max_batch, gradient_checkpointing)
    "batch 1, one pass, whole step's graph": (1, 256, False),
    "batch 1, two-pass, chunk 1": (1, 1, False),
    "batch 1, two-pass, chunk 1 + gradient checkpointing": (1, 1, True),
    "batch 2, two-pass, chunk 2 + gradient checkpointing": (2, 2, True),
}


def peak_gib(device: str) -> dict[str, float]:
    """The peak since the last `reset_peak`: resident memory (Linux VmHWM) or torch's CUDA allocator peaks."""
    import torch

    if device.startswith("cuda"):
        return {"cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "cuda_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    status = Path("/proc/self/status").read_text()
    return {"rss_gib": int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20}


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def child(model: str, device: str, fp16: bool, batch: int, max_batch: int, checkpointing: bool) -> None:
    import torch

    from noop_rt.demo.digits import write_image_folders
    from noop_rt.runtime.classes import make_prompts
    from noop_rt.train.backbones import load_backbone, pick_device
    from noop_rt.train.checkpoint import backbone_fingerprint
    from noop_rt.train.noop import TrainConfig, train_noop
    from noop_rt.train.trainer import encode_split, fewshot_split

    dev = pick_device(device)
    backbone = load_backbone(model, dtype=torch.float16 if fp16 else torch.float32, device=dev)
    fingerprint = hashlib.sha256(json.dumps(backbone_fingerprint(backbone), sort_keys=True).encode()).hexdigest()[:16]
    where = str(backbone.device)
    modules = (backbone.unet, backbone.text_encoder, backbone.encoder)
    weights = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]) / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folders(Path(tmp), shots=1, val_shots=1)
        for split in ("train", "val"):  # keep two classes: the memory of one step does not depend on the class count
            for extra in sorted((Path(tmp) / split).iterdir())[2:]:
                for f in extra.iterdir():
                    f.unlink()
                extra.rmdir()
        split = fewshot_split(tmp, shots=1, val_shots=1, seed=0)
        z_train, y_train, z_val, y_val = encode_split(backbone, split, show_progress=False)
    loading = peak_gib(where)
    reset_peak(where)
    config = TrainConfig(t_star=500, epochs=1, batch_size=batch, negatives=2, max_batch=max_batch,
                         gradient_checkpointing=checkpointing)
    start = time.time()
    train_noop(backbone, make_prompts(split.classes, TEMPLATE), TEMPLATE, z_train, y_train, z_val,
               y_val, config)
    print(json.dumps({"weights_gib": weights, "load_and_encode": loading, "peak": peak_gib(where),
                      "seconds": round(time.time() - start, 1), "device": where, "dtype": str(backbone.dtype),
                      "latent_shape": list(backbone.latent_shape), "steps": len(split.train),
                      "protocol": {"train_config": config.to_dict(), "classes": split.classes,
                                   "template": TEMPLATE, "split": "1 shot + 1 validation image per class, "
                                   "the first 2 digit classes (by name) of noop-rt demo-data",
                                   "backbone": {"source": backbone.source, "kind": backbone.kind,
                                                "resolution": backbone.resolution,
                                                "prediction_type": backbone.prediction_type,
                                                "fingerprint": fingerprint}}}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="diffusers SD folder (default: SD-1.5 shape, random weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/noop-rt"))
    parser.add_argument("--name", default="train_memory")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--child", nargs=3, metavar=("BATCH", "MAX_BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.device, args.fp16, int(args.child[0]), int(args.child[1]), args.child[2] == "1")
        return
    if args.model is None:
        from noop_rt.build.shape_fixtures import shape_model

        args.model = str(shape_model("sd15-shape", args.cache_dir.expanduser()))
    rows, protocols = {}, {}
    for name, (batch, max_batch, checkpointing) in CONFIGS.items():
        print(f"{name} …", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--child", str(batch),
               str(max_batch), "1" if checkpointing else "0"] + (["--fp16"] if args.fp16 else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        try:
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            rows[name] = {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
        protocols[name] = rows[name].pop("protocol", None)
        rows[name].update(batch=batch, max_batch=max_batch, gradient_checkpointing=checkpointing)
        print(f"  {rows[name]}", file=sys.stderr, flush=True)
    import torch

    from noop_rt.jobs.accuracy import command_line, protocol_lines

    protocol = {"model": args.model, "fp16": args.fp16, "device": args.device,
                "measurement": "one fresh child process per configuration: load + encode, reset the peak, then "
                               "noop.train_noop for one epoch; peak = Linux VmHWM (CPU) or torch CUDA max "
                               "allocated/reserved",
                "runs": protocols}
    out = {"model": args.model, "fp16": args.fp16, "torch": torch.__version__, "machine": platform.processor() or
           platform.machine(), "cpu_threads": torch.get_num_threads(), "runs": rows, "protocol": protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    key = next((k for r in rows.values() if "peak" in r for k in r["peak"]), "rss_gib")
    lines = [f"# NoOp training memory, {args.model.rsplit('/', 1)[-1]}",
             "", f"Produced by `{command_line('train_memory.py')}` (torch {torch.__version__}, "
             f"{out['cpu_threads']} CPU threads). One epoch over 2 "
             "training images (2 classes scored per image; UNet samples per step = batch × 2) plus validation; "
             f"peaks are `{key}`, training's measured after a "
             "reset that follows loading and encoding.", "",
             "| configuration | backbone weights | peak, load + encode | peak, training | training peak minus weights "
             "| training seconds |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | | | failed: {r['error']} | | |")
            continue
        lines.append(f"| {name} | {r['weights_gib']:.2f} GiB | {r['load_and_encode'][key]:.2f} GiB | "
                     f"{r['peak'][key]:.2f} GiB | {r['peak'][key] - r['weights_gib']:.2f} GiB | {r['seconds']} |")
    lines += protocol_lines(protocol)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
