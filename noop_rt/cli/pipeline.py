"""`noop-rt train`, `export`, `verify` and `build`: checkpoint -> bundle -> TensorRT engines."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from noop_rt.cli.main import app, guarded
from noop_rt.cli.options import (
    DeviceOpt,
    JsonOpt,
    PromptsOpt,
    TemplateOpt,
)
from noop_rt.demo import SHOTS, VAL_SHOTS
from noop_rt.runtime.choices import LOSSES
from noop_rt.runtime.errors import BadInputError, ReportedInterrupt
from noop_rt.runtime.outputs import check_writable


# ---------------------------------------------------------------------------------------------- train / export
@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", metavar="DIR",
                                       help="Image-folder tree (DIR/<class>/…, or DIR/train + DIR/val).")],
    out: Annotated[Path, typer.Option("--out", metavar="NAME.pt", help="Checkpoint to write, e.g. pets.pt.")],
    model: Annotated[str, typer.Option("--model", metavar="DIR", help="'demo' or a local diffusers SD folder.")] =
        "demo",
    shots: Annotated[int, typer.Option("--shots", min=1, help="Training images per class.")] = SHOTS,
    val_shots: Annotated[int, typer.Option("--val-shots", min=1, help="Validation images per class "
                                                                      "(when DIR has no val/).")] = VAL_SHOTS,
    timestep: Annotated[int, typer.Option("--timestep", min=0, help="NoOp's fixed timestep t*.")] = 500,
    meta_net: Annotated[bool, typer.Option("--meta-net/--no-meta-net", help="Learn the image-specific offset.")] = True,
    prompt_tuning: Annotated[bool, typer.Option("--prompt-tuning", help="Also learn CoOp-style context.")] = False,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (the best on validation is kept).")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")] = 16,
    lr_noise: Annotated[float, typer.Option("--lr-noise", help="Learning rate of eps_D.")] = 1e-2,
    lr_meta: Annotated[float, typer.Option("--lr-meta", help="Learning rate of the meta-net.")] = 1e-3,
    negatives: Annotated[int, typer.Option("--negatives", min=2, help="Classes scored per image and step.")] = 10,
    loss: Annotated[str, typer.Option("--loss", metavar="NAME", help="l2 | l1 | huber: the error norm, stored in "
                                      "the checkpoint.")] = "l1",
    template: TemplateOpt = None, prompts: PromptsOpt = None,
    lora: Annotated[Path | None, typer.Option("--lora", metavar="FILE", help="A LoRA .safetensors (diffusers or "
                                              "kohya keys) fused into the --model SD folder before training; the "
                                              "checkpoint records it and export bakes it into the bundle.")] = None,
    lora_scale: Annotated[float, typer.Option("--lora-scale", metavar="X", help="LoRA strength.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    device: DeviceOpt = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="Frozen backbone in half precision (CUDA).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help="Trade compute for memory (SD on 24 GB).")] = False,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Largest UNet batch. Below batch-size x "
                                           "negatives, each step takes an exact two-pass gradient holding one "
                                           "chunk's graph (SD-1.5 on 24 GB: --max-batch 2 --gradient-checkpointing)."
                                           )] = 256,
    fit_cascade: Annotated[bool, typer.Option("--fit-cascade/--no-fit-cascade",
                                              help="Fit --method cascade's threshold, shortlist and escalation on the "
                                                   "validation split (scores pruned and adaptive on up to 100 "
                                                   "validation images).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Learn NoOp's dataset noise (+ meta-net) on a few-shot image folder; write NAME.pt atomically."""
    cli_options = {k: str(v) for k, v in locals().items()}

    def go() -> None:
        from noop_rt.runtime.classes import read_prompts_file
        from noop_rt.runtime.extras import require_torch_side
        from noop_rt.runtime.suggest import suggest

        if loss not in LOSSES:
            raise suggest(loss, LOSSES, "loss")
        if out.suffix != ".pt":
            raise BadInputError(f"--out must name a .pt file, got {out}")
        check_writable(out, "--out")
        require_torch_side("`noop-rt train`")
        from noop_rt.train.trainer import train_command

        summary = train_command(data=data, out=out, model=model, shots=shots, val_shots=val_shots, timestep=timestep,
                                meta_net=meta_net, prompt_tuning=prompt_tuning, epochs=epochs, batch_size=batch_size,
                                lr_noise=lr_noise, lr_meta=lr_meta, negatives=negatives, loss=loss,
                                template=template, seed=seed, device=device, fp16=fp16,
                                gradient_checkpointing=gradient_checkpointing, max_batch=max_batch,
                                fit_cascade=fit_cascade,
                                cli_options=cli_options,
                                prompts=read_prompts_file(prompts) if prompts is not None else None,
                                lora=lora, lora_scale=lora_scale,
                                command=shlex.join(["noop-rt", *sys.argv[1:]])
                                if Path(sys.argv[0]).name == "noop-rt" else None)
        if summary["val_accuracy"] >= 1.0:
            print(f"note: the validation split is classified perfectly, so tau ({summary['tau']:.3g}) comes from the "
                  "calibration prior, not the data: probabilities are not calibrated; more --val-shots fix that",
                  file=sys.stderr)
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"wrote {out}: {summary['classes']} classes, {summary['train_images']} training images, validation "
                  f"accuracy {summary['val_accuracy']:.4f} (epoch {summary['best_epoch']}), tau {summary['tau']:.3g}, "
                  f"{summary['minutes']:.1f} min")
        if summary["interrupted_in_epoch"] is not None:
            print(f"interrupted in epoch {summary['interrupted_in_epoch']}: {out} holds the best epoch before it "
                  f"(epoch {summary['best_epoch']})", file=sys.stderr)
            raise ReportedInterrupt

    guarded(go)


@app.command("fit-cascade")
def fit_cascade(
    ckpt: Annotated[Path, typer.Option("--ckpt", metavar="NAME.pt", help="NoOp checkpoint to fit (written in place).")],
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="Labelled validation images, DIR/<class>/<image>: "
                                       "not the training shots.")],
    bundle: Annotated[Path | None, typer.Option("--bundle", metavar="DIR", help="Also write the fit into this bundle "
                                                "(exported from the checkpoint).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed of the escalation candidates.")] = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Fit --method cascade's threshold, shortlist and escalation on a validation folder (what `train` does at its
    end), for checkpoints trained before noop-rt 0.4."""
    def go() -> None:
        from noop_rt.runtime.extras import require_torch_side

        if not ckpt.is_file():
            raise BadInputError(f"checkpoint not found: {ckpt}")
        require_torch_side("`noop-rt fit-cascade`")
        from noop_rt.train.cascade_fit import fit_checkpoint

        fitted = fit_checkpoint(ckpt, data, bundle, seed=seed, device=device)
        if as_json:
            print(json.dumps(fitted, indent=2))
        else:
            print(f"wrote {ckpt}{f' and {bundle}' if bundle else ''}: cascade threshold {fitted['threshold']:.6g}, "
                  f"shortlist {fitted['shortlist']}, escalate {fitted['escalate']}, error bound "
                  f"{fitted['error_bound']:.4g} (fitted on {fitted['val_images']} images)")

    guarded(go)


@app.command()
def export(
    ckpt: Annotated[Path, typer.Option("--ckpt", metavar="NAME.pt", help="NoOp checkpoint.")],
    out: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Bundle folder (default "
                                             "export/NAME).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="Half-precision graphs (GPU/TensorRT).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Quantize the classifier graph to INT8 (CPU engines), "
                                       "calibrated on the checkpoint's few-shot images; refused (exit 3) below 99 "
                                       "% top-1 agreement with fp32 on the validation split.")]
        = False,
    calibrate_data: Annotated[Path | None, typer.Option("--calibrate-data", metavar="DIR", help="--int8: "
                                                        "calibration images (default: the checkpoint's own).")]
        = None,
    images_per_batch: Annotated[int, typer.Option("--images-per-batch", min=1,
                                                  help="Max images per UNet call: max batch = this x classes.")] = 4,
    validate_data: Annotated[Path | None, typer.Option("--validate-data", metavar="DIR", help="Images to validate "
                                                       "top-1 agreement on (default: the demo examples).")] = None,
    tolerance: Annotated[float | None, typer.Option("--tolerance", help="Max relative error per graph.")] = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="Required top-1 agreement.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-export over an existing bundle.")] = False,
    lora: Annotated[Path | None, typer.Option("--lora", metavar="FILE", help="Where the LoRA the checkpoint was "
                                              "trained with is now (default: the path it recorded); it is fused "
                                              "into the graphs.")] = None,
    text_encoder: Annotated[bool, typer.Option("--text-encoder/--no-text-encoder", help="Ship the text encoder "
                                               "and tokenizer (default). --no-text-encoder: only the trained "
                                               "classes' cached embeddings; the bundle then classifies its "
                                               "trained classes only.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to an ONNX bundle (the classifier graph and the scorer, encoder, noise and text-encoder
    graphs, weights stored once), validated against PyTorch."""
    def go() -> None:
        from noop_rt.runtime.extras import require_torch_side

        if ckpt.is_dir():
            raise BadInputError(f"--ckpt {ckpt} is a folder" + (" (an exported bundle); export takes the checkpoint "
                                                                "it came from, NAME.pt" if (ckpt / "manifest.json")
                                                                .is_file() else "; pass a checkpoint NAME.pt"))
        if not ckpt.is_file():
            raise BadInputError(f"checkpoint not found: {ckpt}")
        require_torch_side("`noop-rt export`")
        from noop_rt.build.export import ExportOptions, collect_images, export_bundle

        if fp16 and int8:
            raise BadInputError("choose one of --fp16 and --int8")
        precision = "int8" if int8 else "fp16" if fp16 else "fp32"
        target = check_writable(out or Path("export") / (ckpt.stem + ("-int8" if int8 else "")), "--out",
                                folder=True)
        options = ExportOptions(opset=opset, precision=precision, force=force,
                                images_per_batch=images_per_batch, tolerance=tolerance, min_agreement=min_agreement,
                                validate_images=collect_images(validate_data) if validate_data else [],
                                calibrate_images=collect_images(calibrate_data) if calibrate_data else [],
                                lora=lora, text_encoder=text_encoder)
        report = export_bundle(ckpt, target, options)
        if as_json:
            print(json.dumps({"out": str(report.out), "cached": report.cached, "seconds": report.seconds,
                              "validation": report.validation}, indent=2))
        else:
            verb = "found" if report.cached else "wrote"
            print(f"{verb} {report.out} ({report.validation['precision']}, validation "
                  f"{'passed' if report.validation['passed'] else 'FAILED'}, {report.seconds:.1f} s)")

    guarded(go)


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE_DIR", help="Bundle folder written by noop-rt export.")],
    as_json: JsonOpt = False,
) -> None:
    """Full check of a bundle: every file's sha256, every graph loads on onnxruntime, the class embeddings and the
    tokenizer read."""
    def go() -> None:
        from noop_rt.runtime.verify import verify_bundle

        report = verify_bundle(bundle)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            for line in report["checks"]:
                print(f"  ✓ {line}")
            print(f"{bundle}: verified ({report['files']} files, {report['bytes'] / 1e6:.1f} MB hashed)")

    guarded(go)


@app.command()
def build(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE_DIR", help="Bundle folder written by noop-rt export "
                                           "--fp16.")],
    out: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Engine folder (default "
                                             "engines/NAME).")] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", metavar="FILE",
                                                      help="Reused across builds.")] = None,
    optimization_level: Annotated[int, typer.Option("--optimization-level", min=0, max=5,
                                                    help="TensorRT builder optimization level.")] = 3,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the engines match.")] = False,
) -> None:
    """Build TensorRT FP16 engines for a bundle (needs TensorRT and an NVIDIA GPU)."""
    def go() -> None:
        from noop_rt.build.engines import BuildOptions, build_engines

        record = build_engines(bundle, BuildOptions(out=out, timing_cache=timing_cache,
                                                    optimization_level=optimization_level, force=force))
        print(f"engines ready for {bundle}: TensorRT {record.get('tensorrt')} on {record.get('gpu')}")

    guarded(go)


