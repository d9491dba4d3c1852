"""`noop-rt`: the command line. Parse, call the Python API (`noop_rt.load` and the jobs built on it), print.
NoopError -> one line on stderr + its exit code. Arguments and inputs are checked before any model is opened."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from noop_rt.demo import SHOTS, VAL_SHOTS
from noop_rt.runtime.backends.base import BACKENDS
from noop_rt.runtime.errors import BadInputError, NoopError, UsageError
from noop_rt.runtime.strategies import LOSSES, METHODS
from noop_rt.serve import ServeOptions


def _plain_help_labels() -> None:
    """Help shows plain value labels (`IMAGE...`, `--shots N`, `--lr-noise X`) instead of typer's type labels
    (`<list[Path]>`, `<int range>`, `<float>`) and brace decoration (`{IMAGE...}...`)."""
    from typer.core import TyperArgument, TyperOption

    arg_label, arg_usage = TyperArgument.display_type_rich, TyperArgument._usage_display_name
    opt_label = TyperOption.display_type_rich
    plain = {"int": "N", "float": "X", "str": "TEXT", "Path": "PATH"}

    def argument_label(self: Any, ctx: Any) -> str:
        return "" if self.metavar else arg_label(self, ctx=ctx)

    def argument_usage(self: Any) -> str:
        return str(self.metavar) if self.metavar else arg_usage(self)

    def option_label(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None or self.is_flag:
            return opt_label(self, ctx=ctx)
        label = str(opt_label(self, ctx=ctx) or "").strip("<>").split(" ")[0]
        return plain.get(label, label.upper() or None)

    TyperArgument.display_type_rich = argument_label  # type: ignore[method-assign]
    TyperArgument._usage_display_name = argument_usage  # type: ignore[method-assign]
    TyperOption.display_type_rich = option_label  # type: ignore[method-assign]


_plain_help_labels()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Diffusion classifiers at one UNet pass per class: train NoOp, export to ONNX, build "
                       "TensorRT engines, classify.")
_state: dict[str, bool] = {"debug": False}


def _fail(exc: BaseException) -> None:
    code = exc.exit_code if isinstance(exc, NoopError) else 1
    if _state["debug"]:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) if isinstance(exc, NoopError) else f"internal error: {type(exc).__name__}: {exc}"
    print(f"error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
    raise typer.Exit(code)


def _run(fn: Any) -> Any:
    """Call the library; map any exception to one line on stderr (traceback only with --debug)."""
    try:
        return fn()
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as shell tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:
        _fail(exc)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------------------------------------- shared options
BundleOpt = Annotated[Path | None, typer.Option("--bundle", metavar="DIR",
                                                help="Exported bundle folder (onnxruntime/OpenVINO/TensorRT).")]
CkptOpt = Annotated[Path | None, typer.Option("--ckpt", metavar="NAME.pt", help="NoOp checkpoint (torch backend).")]
ModelOpt = Annotated[str | None, typer.Option("--model", metavar="DIR", help="A local diffusers SD folder, or "
                                              "'demo' (zero-shot strategies, torch backend).")]
ClassesOpt = Annotated[str | None, typer.Option("--classes", metavar="A,B,C", help="Comma-separated class names.")]
PromptsOpt = Annotated[Path | None, typer.Option("--prompts", metavar="FILE", help="CSV of class and prompt (Li et "
                                                 "al.'s prompt files work: prompt,classname,classidx).")]
TemplateOpt = Annotated[str | None, typer.Option("--template", metavar="TEXT", help="Prompt template with one "
                                                 "'{}', e.g. 'a photo of a {}'.")]
BackendOpt = Annotated[str, typer.Option("--backend", metavar="NAME",
                                         help="auto | tensorrt | onnxruntime | openvino | torch.")]
EnginesOpt = Annotated[Path | None, typer.Option("--engines", metavar="DIR", help="TensorRT engine folder from "
                                                 "`noop-rt build` (default engines/<bundle name>).")]
MethodOpt = Annotated[str | None, typer.Option("--method", metavar="NAME", help="noop | baseline | adaptive | "
                                               "pruned (default: noop when a learned noise is loaded, else "
                                               "baseline).")]
NoisesOpt = Annotated[int | None, typer.Option("--noises", min=1, metavar="N", help="(t, eps) pairs: baseline "
                                               "pairs (default 100), pruned's maximum (100), adaptive's last "
                                               "stage with N/10 keep 5 before it (when --stages is not given).")]
StagesOpt = Annotated[str | None, typer.Option("--stages", metavar="P:K,...", help="Adaptive stages, pairs:keep "
                                               "(default Li et al.'s Pets 25:5,250:1), or a published setting: "
                                               "pets, cifar10, stl10, food, flowers, aircraft, imagenet, objectnet.")]
LossOpt = Annotated[str | None, typer.Option("--loss", metavar="NAME", help="l2 | l1 | huber (default: the "
                                             "model's own, else l2).")]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Noise seed of the random strategies.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, metavar="K", help="How many classes to report per image.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEV", help="auto | cpu | cuda[:N].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batch", min=1, metavar="N", help="Largest UNet batch (B*C) "
                                                 "per call (default: the bundle's own, sized at export; 256 on "
                                                 "torch).")]
RobustOpt = Annotated[bool, typer.Option("--robust", help="RDC likelihood maximisation first (torch backend).")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="torch backend in half precision.")]
LoraOpt = Annotated[Path | None, typer.Option("--lora", metavar="FILE", help="A LoRA .safetensors (diffusers or "
                                              "kohya keys) fused into the --model SD folder; with --ckpt, where the "
                                              "one it was trained with moved to.")]
LoraScaleOpt = Annotated[float | None, typer.Option("--lora-scale", metavar="X", help="LoRA strength (default 1, or "
                                                    "the checkpoint's).")]


def _source(bundle: Path | None, ckpt: Path | None, model: str | None) -> tuple[str | Path | None, str | None]:
    """(the source, its kind as the user named it)."""
    given = [(x, kind) for x, kind in ((bundle, "bundle"), (ckpt, "checkpoint"), (model, "diffusers"))
             if x is not None]
    if len(given) > 1:
        raise BadInputError("pass one of --bundle, --ckpt and --model")
    return given[0] if given else (None, None)


def _check_choices(backend: str, method: str | None, loss: str | None) -> None:
    from noop_rt.runtime.suggest import suggest

    if backend not in BACKENDS:
        raise suggest(backend, BACKENDS, "backend")
    if method is not None and method not in METHODS:
        raise suggest(method, METHODS, "method")
    if loss is not None and loss not in LOSSES:
        raise suggest(loss, LOSSES, "loss")


def _strategy(noises: int | None, stages: str | None, loss: str | None, seed: int, robust: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"seed": seed}
    if noises is not None:
        options["pairs"] = noises
    if loss is not None:
        options["loss"] = loss
    if stages is not None:
        from noop_rt.runtime.strategies import parse_stages

        try:
            options["stages"] = parse_stages(stages)
        except ValueError as exc:
            raise BadInputError(f"--stages: {exc}") from None
    if robust:
        from noop_rt.train.robust import RobustConfig

        options["robust"] = RobustConfig(seed=seed)
    return options


def _request(source: tuple[Any, str | None], *, backend: str, device: str, method: str | None,
             classes: str | list[str] | None, prompts: Path | None, template: str | None, strategy: dict[str, Any],
             max_batch: int | None = None, fp16: bool = False, engines: Path | None = None,
             classes_from: str | None = None, lora: Path | None = None, lora_scale: float | None = None) -> Any:
    """The `LoadOptions` a command's flags describe: what `noop_rt.load` opens, here, in batch workers and in
    server replicas."""
    from noop_rt.api import LoadOptions

    path, kind = source
    return LoadOptions.of(path, kind=kind, backend=backend, device=device, fp16=fp16, max_batch=max_batch,
                          engines=engines, classes=classes, template=template, prompts=prompts,
                          classes_from=classes_from, method=method, lora=lora, lora_scale=lora_scale, **strategy)


def _open(request: Any) -> Any:
    """`noop_rt.load(request)`, with drift warnings and the loader's notes on stderr."""
    from noop_rt.api import load

    classifier = load(request)
    classifier.on_drift = lambda message: print(f"warning: {message}", file=sys.stderr)
    for note in classifier.notes:
        print(f"note: {note}", file=sys.stderr)
    return classifier


def _check_images(images: list[Path]) -> None:
    from noop_rt.runtime.images import is_uri

    if not images:
        raise BadInputError("no images given")
    for p in images:
        if is_uri(p):
            continue
        if p.is_dir():
            raise BadInputError(f"{p} is a folder, not an image: pass its images (e.g. {p}/*.png) or run "
                                f"noop-rt batch {p} --out labels.jsonl")
        if not p.is_file():
            raise BadInputError(f"image not found: {p}")


# ---------------------------------------------------------------------------------------------- classify / eval
def _classify(images: list[Path], classifier: Any, top_k: int, as_json: bool, truth_table: bool = False) -> None:
    from tqdm import tqdm

    with tqdm(total=len(images), desc="classify", unit="img", file=sys.stderr, disable=len(images) < 32,
              leave=False) as bar:
        results = classifier.classify([str(p) for p in images], top_k=top_k, progress=bar.update)
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    elif truth_table:
        _print_truth_table(results)
    else:
        for r in results:
            rest = ", ".join(f"{t.label} {t.prob:.2f}" for t in r.top[1:])
            print(f"{r.image}: {r.label} ({r.prob:.2f})" + (f"  | {rest}" if rest else ""))
    print(classifier.speed_line(results), file=sys.stderr)


def _print_truth_table(results: list[Any]) -> None:
    """A table of predictions against the true class, which the file name gives (`seven.png` is a seven)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in demo: bundled example digits")
    for col in ("image", "true", "predicted", "prob", "", "runner-up", "UNet evals"):
        table.add_column(col)
    correct = 0
    for r in results:
        truth = Path(r.image).stem.replace("_", " ")
        ok = r.label == truth
        correct += ok
        runner = f"{r.top[1].label} {r.top[1].prob:.2f}" if len(r.top) > 1 else ""
        table.add_row(Path(r.image).name, truth, r.label, f"{r.prob:.2f}", "✓" if ok else "✗", runner,
                      str(r.unet_evals))
    table.caption = f"{correct}/{len(results)} correct"
    Console(width=100).print(table)


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files.", show_default=False)],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    prompts: PromptsOpt = None,
    data: Annotated[Path | None, typer.Option("--data", metavar="DIR",
                                              help="Take the class names from an image-folder tree.")] = None,
    template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = None,
    stages: StagesOpt = None, loss: LossOpt = None, seed: SeedOpt = 0, top_k: TopKOpt = 5, device: DeviceOpt = "auto",
    fp16: Fp16Opt = False, max_batch: MaxBatchOpt = None, robust: RobustOpt = False, engines: EnginesOpt = None,
    lora: LoraOpt = None, lora_scale: LoraScaleOpt = None, as_json: JsonOpt = False,
) -> None:
    """Classify images. No --bundle/--ckpt/--model: the built-in demo (handwritten digits)."""
    def go() -> None:
        from noop_rt.runtime.classes import ImageFolder

        _check_choices(backend, method, loss)
        _check_images(images)
        source = _source(bundle, ckpt, model)
        strategy = _strategy(noises, stages, loss, seed, robust)
        class_list: str | list[str] | None = classes
        classes_from = None
        if classes is None and data is not None:
            class_list, classes_from = ImageFolder.scan(data).classes, f"--data {data}"
        classifier = _open(_request(source, backend=backend, device=device, method=method, classes=class_list,
                                    prompts=prompts, template=template, strategy=strategy, max_batch=max_batch,
                                    fp16=fp16, engines=engines, classes_from=classes_from, lora=lora,
                                    lora_scale=lora_scale))
        _classify(images, classifier, top_k, as_json)

    _run(go)


@app.command("eval")
def eval_command(
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="Image-folder tree: DIR/<class>/<images>.")],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, prompts: PromptsOpt = None,
    template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = None,
    stages: StagesOpt = None, loss: LossOpt = None, seed: SeedOpt = 0, device: DeviceOpt = "auto",
    fp16: Fp16Opt = False, max_batch: MaxBatchOpt = None, robust: RobustOpt = False, engines: EnginesOpt = None,
    lora: LoraOpt = None, lora_scale: LoraScaleOpt = None, as_json: JsonOpt = False,
) -> None:
    """Accuracy, per-class accuracy and confusion matrix on a labelled image folder; --json records the protocol."""
    def go() -> None:
        from noop_rt.jobs.evaluate import evaluate_folder
        from noop_rt.runtime.classes import ImageFolder

        _check_choices(backend, method, loss)
        dataset = ImageFolder.scan(data)
        source = _source(bundle, ckpt, model)
        strategy = _strategy(noises, stages, loss, seed, robust)
        zero_shot_model = model is not None and model != "demo"
        classifier = _open(_request(source, backend=backend, device=device, method=method,
                                    classes=dataset.classes if zero_shot_model and prompts is None else None,
                                    prompts=prompts, template=template, strategy=strategy, max_batch=max_batch,
                                    fp16=fp16, engines=engines, lora=lora, lora_scale=lora_scale))
        report = evaluate_folder(classifier, dataset)
        if as_json:
            print(json.dumps(report, indent=2))
            return
        print(f"accuracy {report['accuracy']:.4f} on {report['n']} images ({report['method']}, "
              f"{report['unet_evals_per_image']:.0f} UNet evals/image, backend {report['backend']})")
        width = max(len(n) for n in report["classes"])
        for name, acc in report["per_class"].items():
            print(f"  {name:<{width}}  {acc:.3f}")
        print("confusion (rows: true, columns: predicted):")
        for name, row in zip(report["classes"], report["confusion"], strict=True):
            print(f"  {name:<{width}}  " + " ".join(f"{v:4d}" for v in row))

    _run(go)


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
        require_torch_side("`noop-rt train`")
        from noop_rt.train.trainer import train_command

        summary = train_command(data=data, out=out, model=model, shots=shots, val_shots=val_shots, timestep=timestep,
                                meta_net=meta_net, prompt_tuning=prompt_tuning, epochs=epochs, batch_size=batch_size,
                                lr_noise=lr_noise, lr_meta=lr_meta, negatives=negatives, loss=loss,
                                template=template, seed=seed, device=device, fp16=fp16,
                                gradient_checkpointing=gradient_checkpointing, max_batch=max_batch,
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

    _run(go)


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
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to an ONNX bundle (the classifier graph and the scorer, encoder, noise and text-encoder
    graphs, weights stored once), validated against PyTorch."""
    def go() -> None:
        from noop_rt.runtime.extras import require_torch_side

        require_torch_side("`noop-rt export`")
        from noop_rt.build.export import ExportOptions, collect_images, export_bundle

        if fp16 and int8:
            raise BadInputError("choose one of --fp16 and --int8")
        precision = "int8" if int8 else "fp16" if fp16 else "fp32"
        target = out or Path("export") / (ckpt.stem + ("-int8" if int8 else ""))
        options = ExportOptions(opset=opset, precision=precision, force=force,
                                images_per_batch=images_per_batch, tolerance=tolerance, min_agreement=min_agreement,
                                validate_images=collect_images(validate_data) if validate_data else [],
                                calibrate_images=collect_images(calibrate_data) if calibrate_data else [],
                                lora=lora)
        report = export_bundle(ckpt, target, options)
        if as_json:
            print(json.dumps({"out": str(report.out), "cached": report.cached, "seconds": report.seconds,
                              "validation": report.validation}, indent=2))
        else:
            verb = "found" if report.cached else "wrote"
            print(f"{verb} {report.out} ({report.validation['precision']}, validation "
                  f"{'passed' if report.validation['passed'] else 'FAILED'}, {report.seconds:.1f} s)")

    _run(go)


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

    _run(go)


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

    _run(go)


# ---------------------------------------------------------------------------------------------- batch / bench
@app.command()
def batch(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Images, folders, globs, or .txt/.parquet "
                                                "lists of paths.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="FILE.parquet or FILE.jsonl (resumes if it "
                                      "exists).")],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    prompts: PromptsOpt = None, template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None,
    noises: NoisesOpt = None, stages: StagesOpt = None, loss: LossOpt = None, seed: SeedOpt = 0, top_k: TopKOpt = 5,
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data: a local cluster, or `--ray ADDRESS` "
                                      "(auto, ray://host:port, host:port) / RAY_ADDRESS for an existing one.")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", metavar="ADDRESS",
                                                    help="Same as --ray ADDRESS.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray actors (one model copy each).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs per Ray actor.")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per classification call.")] = 16,
    device: DeviceOpt = "auto", max_batch: MaxBatchOpt = None, engines: EnginesOpt = None, lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None, as_json: JsonOpt = False,
) -> None:
    """Classify many images into a parquet/jsonl file, in process or on a Ray cluster; resumable."""
    def go() -> None:
        from noop_rt.jobs.batch import BatchOptions, run_batch

        _check_choices(backend, method, loss)
        load = _request(_source(bundle, ckpt, model), backend=backend, device=device, method=method, classes=classes,
                        prompts=prompts, template=template, strategy=_strategy(noises, stages, loss, seed, False),
                        max_batch=max_batch, engines=engines, lora=lora, lora_scale=lora_scale)
        options = BatchOptions(top_k=top_k, batch_size=batch_size, ray=ray or ray_address is not None,
                               ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
        report = run_batch(inputs, out, load, options)
        summary = {"out": str(report.out), "total": report.total, "skipped": report.skipped,
                   "classified": report.classified, "failed": report.failed, "seconds": round(report.seconds, 2),
                   "images_per_s": round(report.images_per_s, 2), "backend": report.backend, "mode": report.mode,
                   "drift": report.drift}
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"wrote {report.out}: {report.total} paths ({report.classified} classified, {report.failed} "
                  f"unreadable, {report.skipped} already there) in {report.seconds:.1f} s, "
                  f"{report.images_per_s:.1f} images/s ({report.mode}, {report.backend})")
        if report.failed and not report.classified:  # e.g. a mistyped folder: not a silent success
            raise BadInputError(f"none of the {report.failed} new input(s) could be read (first: "
                                f"{report.first_error}); their error rows are in {report.out}")

    _run(go)


@app.command()
def bench(
    bundle: BundleOpt = None, ckpt: CkptOpt = None,
    backbone: Annotated[str, typer.Option("--backbone", metavar="NAME", help="'ckpt' (the bundle/ckpt/demo model) "
                                          "or 'sd15-shape' (SD-1.5 architecture, random weights, 512 px).")] = "ckpt",
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="Classes for sd15-shape.")] = 37,
    baseline_noises: Annotated[int, typer.Option("--baseline-noises", min=1, help="Pairs of the baseline.")] = 100,
    measured_pairs: Annotated[int, typer.Option("--measured-pairs", min=1, help="Baseline pairs actually timed; "
                                                "the rest extrapolated (labelled).")] = 10,
    backends: Annotated[str, typer.Option("--backends", metavar="A,B", help="Comma-separated: torch, onnxruntime, "
                                          "openvino, tensorrt.")] = "torch,onnxruntime",
    images: Annotated[Path | None, typer.Option("--images", metavar="DIR", help="Folder of images to time on.")]
        = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed images per backend.")] = 10,
    device: DeviceOpt = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="Half precision (torch on CUDA; fp16 bundle for sd15-shape).")]
        = False,
    startup: Annotated[bool, typer.Option("--startup/--no-startup", help="Also time a fresh `noop-rt classify` "
                                          "process (import, open, first image).")] = True,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", metavar="DIR", help="Where sd15-shape models/bundles "
                                            "are kept.")] = Path("~/.cache/noop-rt"),
    json_file: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the report as JSON.")]
        = None,
    plot_file: Annotated[Path | None, typer.Option("--plot", metavar="FILE", help="Write a latency bar chart "
                                                   "(PNG).")] = None,
    engines: EnginesOpt = None,
) -> None:
    """Latency/throughput of NoOp vs the N-noise baseline per backend, measured in one run."""
    def go() -> None:
        from noop_rt.jobs.bench import BenchOptions, bench_command, check_names

        options = BenchOptions(backends=[b.strip() for b in backends.split(",") if b.strip()],
                               baseline_noises=baseline_noises, baseline_measured_pairs=measured_pairs, runs=runs,
                               device=device, fp16=fp16, startup=startup)
        names = check_names(options.backends)
        if backbone == "ckpt":
            report, table = bench_command(options, bundle=bundle, ckpt=ckpt, images=images, engines=engines)
        else:
            fixture = _shape_fixture(backbone, bundle, ckpt, num_classes, cache_dir, fp16,
                                     bundle_needed=any(n != "torch" for n in names))
            report, table = bench_command(options, bundle=fixture.bundle, ckpt=fixture.ckpt, images=images,
                                          engines=engines, backbone=backbone, reference_gflop=fixture.reference_gflop)
        print(table)
        if json_file is not None:
            from noop_rt.runtime.bundle import write_json_atomic

            json_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(json_file, report)
        if plot_file is not None:
            from noop_rt.jobs.bench import plot

            plot(report, plot_file)

    _run(go)


def _shape_fixture(backbone: str, bundle: Path | None, ckpt: Path | None, classes: int, cache_dir: Path, fp16: bool,
                   bundle_needed: bool) -> Any:
    """`bench --backbone NAME-shape`: the build side makes (once, cached) the random-weight model, its checkpoint and
    bundle; bench then times them through the API like any other model."""
    from noop_rt.build import SHAPE_FIXTURES
    from noop_rt.runtime.extras import require_torch_side

    if backbone not in SHAPE_FIXTURES:
        from noop_rt.runtime.suggest import suggest

        raise suggest(backbone, ("ckpt", *SHAPE_FIXTURES), "backbone")
    if bundle is not None or ckpt is not None:
        raise UsageError(f"--backbone {backbone} builds its own model; drop --bundle/--ckpt")
    require_torch_side(f"`noop-rt bench --backbone {backbone}`")
    from noop_rt.build.shape_fixtures import prepare

    return prepare(backbone, classes, cache_dir, fp16=fp16, bundle=bundle_needed)


@app.command()
def serve(
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    prompts: PromptsOpt = None, template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None,
    noises: NoisesOpt = None, stages: StagesOpt = None, loss: LossOpt = None, seed: SeedOpt = 0, top_k: TopKOpt = 5,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="HTTP port (0: any free "
                                      "port; the printed URL says which).")] = 8000,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Model replicas (one classifier each).")] = 1,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", min=0.0, help="GPUs per replica.")] = 0.0,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Engine threads per replica (default: one "
                                                "per core with one local replica, or the engine's own with "
                                                "--concurrent-batches 1; the cores split between several replicas; "
                                                "the engine's own on a cluster).")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Images gathered into one "
                                                "B*C UNet batch.")] = 8,
    concurrent_batches: Annotated[int | None, typer.Option("--concurrent-batches", min=1, help="Batches a replica "
                                                           "runs at once (default: 2 on onnxruntime, else 1).")] = None,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0.0, help="Longest wait for a batch to "
                                                 "fill when one can start at once (requests that arrive while all "
                                                 "of a replica's batches run are batched anyway).")]
    = ServeOptions.batch_wait_ms,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.0, help="Largest request body (0: no "
                                                 "limit).")] = 10.0,
    ray_address: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help="An existing Ray cluster "
                                                    "(default: RAY_ADDRESS, else a local one).")] = None,
    device: DeviceOpt = "auto", max_batch: MaxBatchOpt = None, engines: EnginesOpt = None, lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = None,
) -> None:
    """Serve the classifier over HTTP on Ray Serve: /v1/classify, the KServe v2 protocol, a web page at /."""
    def go() -> None:
        from noop_rt.serve import run_server

        _check_choices(backend, method, loss)
        load = _request(_source(bundle, ckpt, model), backend=backend, device=device, method=method, classes=classes,
                        prompts=prompts, template=template, strategy=_strategy(noises, stages, loss, seed, False),
                        max_batch=max_batch, engines=engines, lora=lora, lora_scale=lora_scale)
        run_server(load, ServeOptions(host=host, port=port, replicas=replicas, gpus_per_replica=gpus_per_replica,
                                      threads=threads, max_batch_size=max_batch_size,
                                      concurrent_batches=concurrent_batches, batch_wait_ms=batch_wait_ms,
                                      max_upload_mb=max_upload_mb, ray_address=ray_address, top_k=top_k))

    _run(go)


# ---------------------------------------------------------------------------------------------- demo
@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write train/ val/ test/ image-folder trees "
                                        "into.")],
    shots: Annotated[int, typer.Option("--shots", min=1, help="Training images per class.")] = SHOTS,
    val_shots: Annotated[int, typer.Option("--val-shots", min=1, help="Validation images per class.")] = VAL_SHOTS,
) -> None:
    """Write the demo's digits split (few-shot train, val, held-out test) as image folders."""
    def go() -> None:
        from noop_rt.demo.digits import write_image_folders

        if out.exists() and any(out.iterdir()):
            raise BadInputError(f"{out} exists and is not empty")
        counts = write_image_folders(out, shots, val_shots)
        print(f"wrote {out}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))

    _run(go)


@app.command()
def demo(backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = None,
         as_json: JsonOpt = False) -> None:
    """Classify the bundled example digits with the built-in demo and print a table."""
    def go() -> None:
        from noop_rt.demo import EXAMPLES_DIR

        _check_choices(backend, method, None)
        images = sorted(EXAMPLES_DIR.glob("*.png"))
        if not images:
            raise BadInputError(f"no example images in {EXAMPLES_DIR}")
        classifier = _open(_request((None, None), backend=backend, device="auto", method=method, classes=None,
                                    prompts=None, template=None, strategy=_strategy(noises, None, None, 0, False)))
        _classify(images, classifier, 3, as_json, truth_table=not as_json)

    _run(go)


RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.-]+:\d+)$")


def ray_address_argv(argv: list[str]) -> list[str]:
    """`batch … --ray ADDRESS` (design §3) -> `--ray --ray-address ADDRESS`: the option takes an optional value, which
    typer cannot express. Only tokens that look like a Ray address (auto, local, ray://…, host:port) are taken."""
    if "batch" not in argv:
        return argv
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--ray" and RAY_ADDRESS.match(out[i + 1]):
            out[i:i + 2] = ["--ray", "--ray-address", out[i + 1]]
            break
    return out


def run() -> None:
    """The console script: usage errors (missing argument, unknown option, bad value) are one `error:` line and
    exit 2, like every other error, instead of click's boxed panel."""
    # typer vendors its own click: find its UsageError (base of BadParameter, MissingParameter, NoSuchOption)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    argv = ray_address_argv(sys.argv[1:])
    try:
        code = app(args=argv, prog_name="noop-rt", standalone_mode=False)
    except usage_error as exc:
        where = f"noop-rt {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent else "noop-rt --help"
        if exc.format_message().strip():  # empty: the help was shown for a bare `noop-rt`
            print(f"error: {exc.format_message()} (see {where})", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    if code == 130:  # typer turns Ctrl-C into Exit(130) without a word
        print("error: aborted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
