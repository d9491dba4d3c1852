"""`noop-rt`: the command line. Thin: parse, call the library, print; NoopError -> one line on stderr + exit code."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from noop_rt.defaults import SHOTS, VAL_SHOTS
from noop_rt.errors import BadInputError, NoopError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the library; map any exception to one line on stderr (traceback only with --debug)."""
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        _fail(exc)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug


BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Exported bundle folder (onnxruntime/TensorRT).")]
CkptOpt = Annotated[Path | None, typer.Option("--ckpt", help="NoOp checkpoint NAME.pt (torch backend).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="A local diffusers SD folder, or 'demo'.")]
ClassesOpt = Annotated[str | None, typer.Option("--classes", help="Comma-separated class names.")]
TemplateOpt = Annotated[str | None, typer.Option("--template", help="Prompt template with one '{}'.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto|tensorrt|onnxruntime|torch")]
EnginesOpt = Annotated[Path | None, typer.Option("--engines", help="TensorRT engine folder from `noop-rt build` "
                                                 "(default engines/<bundle name>).")]
MethodOpt = Annotated[str | None, typer.Option("--method", help="noop|baseline|adaptive|pruned (default: noop "
                                                                "when a learned noise is loaded, else baseline)")]
NoisesOpt = Annotated[int, typer.Option("--noises", min=1, help="(t, eps) pairs for baseline/adaptive/pruned.")]
LossOpt = Annotated[str | None, typer.Option("--loss", help="l2|l1|huber (default: the checkpoint's, else l2).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda[:N] for the torch backend.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", min=1, help="Largest UNet batch (B*C chunks).")]
RobustOpt = Annotated[bool, typer.Option("--robust", help="RDC likelihood maximisation first (torch backend).")]


def _request(bundle: Path | None, ckpt: Path | None, model: str | None, backend: str, classes: str | None,
             data: Path | None, template: str | None, device: str, max_batch: int, fp16: bool = False,
             robust: bool = False, engines: Path | None = None):
    from noop_rt.data import ImageFolder, parse_class_list
    from noop_rt.runtime.loader import Request

    if robust and bundle is None and backend == "auto":
        backend = "torch"  # robust mode takes gradients: the built-in demo runs from its checkpoint

    class_list, classes_from = None, None
    if classes is not None:
        class_list = parse_class_list(classes)
    elif data is not None:
        class_list, classes_from = ImageFolder.scan(data).classes, f"--data {data}"
    return Request(bundle=bundle, ckpt=ckpt, model=model, backend=backend, classes=class_list, template=template,
                   device=device, fp16=fp16, max_batch=max_batch, engines=engines, classes_from=classes_from)


def _options(classifier: Any, method: str | None, noises: int, loss: str | None, seed: int, robust: bool = False):
    from noop_rt.robust import RobustConfig
    from noop_rt.runtime.classifier import StrategyOptions
    from noop_rt.runtime.loader import suggest
    from noop_rt.scoring import LOSSES, METHODS

    method = method or classifier.default_method()
    if method not in METHODS:
        raise suggest(method, METHODS, "method")
    if loss is not None and loss not in LOSSES:
        raise suggest(loss, LOSSES, "loss")
    classifier.check_method(method)
    return StrategyOptions(method=method, noises=noises, seed=seed, loss=loss,
                           robust=RobustConfig(seed=seed) if robust else None)


def _speed_line(timings: Any, classifier: Any, method: str) -> str:
    ms = timings.per_image_ms()
    r = classifier.backend.resolution
    return (f"Speed: {ms['preprocess']:.1f} ms preprocess, {ms['model']:.1f} ms noise+UNet, {ms['scoring']:.1f} ms "
            f"scoring per image at {r}x{r} ({len(classifier.classes)} classes, method {method}, "
            f"backend {classifier.backend.name} on {classifier.backend.device})")


def _classify(images: list[Path], req: Any, method: str | None, noises: int, loss: str | None, seed: int,
              top_k: int, as_json: bool, robust: bool = False, truth_table: bool = False) -> None:
    from noop_rt.data import load_image
    from noop_rt.runtime.classifier import Timings, predict_arrays
    from noop_rt.runtime.loader import open_classifier

    if not images:
        raise BadInputError("no images given")
    classifier = open_classifier(req)
    options = _options(classifier, method, noises, loss, seed, robust)
    import torch

    start = time.perf_counter()
    arrays = [torch.from_numpy(load_image(p, classifier.backend.resolution)) for p in images]
    pre = Timings(preprocess=time.perf_counter() - start)
    preds, timings, per_image = predict_arrays(classifier, arrays, options, top_k)
    timings.add(pre)
    pre_each = pre.preprocess / len(images)
    results = [{"image": str(p), "top": pr.top, "method": options.method, "backend": classifier.backend.name,
                "latency_ms": round(1e3 * (t + pre_each), 3), "unet_evals": pr.unet_evals}
               for p, pr, t in zip(images, preds, per_image, strict=True)]
    if as_json:
        print(json.dumps(results, indent=2))
    elif truth_table:
        _print_truth_table(results)
    else:
        for res in results:
            best = res["top"][0]
            rest = ", ".join(f"{t['class']} {t['prob']:.2f}" for t in res["top"][1:])
            print(f"{res['image']}: {best['class']} ({best['prob']:.2f})" + (f"  | {rest}" if rest else ""))
    print(_speed_line(timings, classifier, options.method), file=sys.stderr)


def _print_truth_table(results: list[dict[str, Any]]) -> None:
    """A table of predictions against the true class, which the file name gives (`seven.png` is a seven)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in demo: bundled example digits")
    for col in ("image", "true", "predicted", "prob", "", "runner-up", "UNet evals"):
        table.add_column(col)
    correct = 0
    for res in results:
        truth = Path(res["image"]).stem.replace("_", " ")
        best = res["top"][0]
        ok = best["class"] == truth
        correct += ok
        runner = f"{res['top'][1]['class']} {res['top'][1]['prob']:.2f}" if len(res["top"]) > 1 else ""
        table.add_row(Path(res["image"]).name, truth, best["class"], f"{best['prob']:.2f}", "✓" if ok else "✗",
                      runner, str(res["unet_evals"]))
    table.caption = f"{correct}/{len(results)} correct"
    Console(width=100).print(table)


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files.", show_default=False)],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    data: Annotated[Path | None, typer.Option("--data", help="Take the class names from an image-folder tree.")] = None,
    template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = 100,
    loss: LossOpt = None, seed: Annotated[int, typer.Option(help="Noise seed for random strategies.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", min=1)] = 5, device: DeviceOpt = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="torch backend in half precision.")] = False,
    max_batch: MaxBatchOpt = 256, robust: RobustOpt = False, engines: EnginesOpt = None, as_json: JsonOpt = False,
) -> None:
    """Classify images. No --bundle/--ckpt/--model: the built-in demo (handwritten digits)."""
    def go() -> None:
        req = _request(bundle, ckpt, model, backend, classes, data, template, device, max_batch, fp16, robust,
                       engines)
        _classify(images, req, method, noises, loss, seed, top_k, as_json, robust)

    _run(go)


@app.command("eval")
def eval_command(
    data: Annotated[Path, typer.Option("--data", help="Image-folder tree: DIR/<class>/<images>.")],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, template: TemplateOpt = None,
    backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = 100, loss: LossOpt = None,
    seed: Annotated[int, typer.Option(help="Noise seed for random strategies.")] = 0, device: DeviceOpt = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="torch backend in half precision.")] = False,
    max_batch: MaxBatchOpt = 256, robust: RobustOpt = False, engines: EnginesOpt = None, as_json: JsonOpt = False,
) -> None:
    """Accuracy, per-class accuracy and confusion matrix on a labelled image folder."""
    def go() -> None:
        from noop_rt.data import ImageFolder
        from noop_rt.runtime.loader import open_classifier

        dataset = ImageFolder.scan(data)
        classes = None if (ckpt or bundle or model in (None, "demo")) else ",".join(dataset.classes)
        req = _request(bundle, ckpt, model, backend, classes, None, template, device, max_batch, fp16, robust,
                       engines)
        classifier = open_classifier(req)
        options = _options(classifier, method, noises, loss, seed, robust)
        from noop_rt.evaluation import evaluate_folder

        report = evaluate_folder(classifier, dataset, options)
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


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Image-folder tree (DIR/<class>/…, or DIR/train + DIR/val).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write, e.g. pets.pt.")],
    model: Annotated[str, typer.Option("--model", help="'demo' or a local diffusers SD folder.")] = "demo",
    shots: Annotated[int, typer.Option("--shots", min=1, help="Training images per class.")] = SHOTS,
    val_shots: Annotated[int, typer.Option("--val-shots", min=1, help="Validation images per class "
                                                                      "(when DIR has no val/).")] = VAL_SHOTS,
    timestep: Annotated[int, typer.Option("--timestep", min=0, help="NoOp's fixed timestep t*.")] = 500,
    meta_net: Annotated[bool, typer.Option("--meta-net/--no-meta-net", help="Learn the image-specific offset.")] = True,
    prompt_tuning: Annotated[bool, typer.Option("--prompt-tuning", help="Also learn CoOp-style context.")] = False,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    lr_noise: Annotated[float, typer.Option("--lr-noise")] = 1e-2,
    lr_meta: Annotated[float, typer.Option("--lr-meta")] = 1e-3,
    negatives: Annotated[int, typer.Option("--negatives", min=2, help="Classes scored per image and step.")] = 10,
    loss: Annotated[str, typer.Option("--loss", help="l2|l1|huber: the error norm, stored in the ckpt")] = "l1",
    template: TemplateOpt = None, seed: Annotated[int, typer.Option()] = 0, device: DeviceOpt = "auto",
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
        import torch

        from noop_rt.backbone import DEMO_SOURCE, load_backbone
        from noop_rt.checkpoint import save_checkpoint
        from noop_rt.configs import DEMO_TEMPLATE
        from noop_rt.data import DEFAULT_TEMPLATE
        from noop_rt.noop import TrainConfig
        from noop_rt.runtime.loader import pick_device, suggest
        from noop_rt.scoring import LOSSES
        from noop_rt.training import fewshot_split, train_checkpoint

        if loss not in LOSSES:
            raise suggest(loss, LOSSES, "loss")
        if out.suffix != ".pt":
            raise BadInputError(f"--out must name a .pt file, got {out}")
        split = fewshot_split(data, shots, val_shots, seed)
        backbone = load_backbone(model, dtype=torch.float16 if fp16 else torch.float32, device=pick_device(device))
        if not 0 <= timestep < backbone.num_train_timesteps:
            raise BadInputError(f"--timestep must be in [0, {backbone.num_train_timesteps})")
        config = TrainConfig(t_star=timestep, epochs=epochs, batch_size=batch_size, lr_noise=lr_noise,
                             lr_meta=lr_meta, meta_net=meta_net, prompt_tuning=prompt_tuning, negatives=negatives,
                             loss=loss, seed=seed, max_batch=max_batch, gradient_checkpointing=gradient_checkpointing)
        tmpl = template or (DEMO_TEMPLATE if backbone.source == DEMO_SOURCE else DEFAULT_TEMPLATE)
        ckpt, result = train_checkpoint(backbone, split, tmpl, config)
        ckpt.train["options"] = cli_options
        if Path(sys.argv[0]).name == "noop-rt":  # run from the console script (not a test runner)
            ckpt.train["command"] = shlex.join(["noop-rt", *sys.argv[1:]])
        ckpt.train["torch_threads"] = torch.get_num_threads()
        ckpt.train["device"] = str(backbone.device)
        save_checkpoint(ckpt, out)
        if result.val_accuracy >= 1.0:
            print(f"note: the validation split is classified perfectly, so tau ({result.tau:.3g}) comes from the "
                  f"calibration prior, not the data: probabilities are not calibrated; more --val-shots fix that",
                  file=sys.stderr)
        summary = {"out": str(out), "classes": len(split.classes), "train_images": len(split.train),
                   "val_images": len(split.val), "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
                   "tau": result.tau, "minutes": round(result.minutes, 2)}
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"wrote {out}: {len(split.classes)} classes, {len(split.train)} training images, validation "
                  f"accuracy {result.val_accuracy:.4f} (epoch {result.best_epoch}), tau {result.tau:.3g}, "
                  f"{result.minutes:.1f} min")

    _run(go)


@app.command()
def export(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="NoOp checkpoint NAME.pt.")],
    out: Annotated[Path | None, typer.Option("--out", help="Bundle folder (default export/NAME).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="Half-precision graphs (GPU/TensorRT).")] = False,
    images_per_batch: Annotated[int, typer.Option("--images-per-batch", min=1,
                                                  help="Max images per UNet call: max batch = this x classes.")] = 4,
    validate_data: Annotated[Path | None, typer.Option("--validate-data", help="Images to validate top-1 "
                                                       "agreement on (default: the demo examples).")] = None,
    tolerance: Annotated[float | None, typer.Option("--tolerance", help="Max relative error per graph.")] = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="Required top-1 agreement.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-export over an existing bundle.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to an ONNX bundle (UNet, text encoder, encoder, noise graph), validated vs PyTorch."""
    def go() -> None:
        from noop_rt.export import ExportOptions, collect_images, export_bundle

        target = out or Path("export") / ckpt.stem
        options = ExportOptions(opset=opset, precision="fp16" if fp16 else "fp32", force=force,
                                images_per_batch=images_per_batch, tolerance=tolerance, min_agreement=min_agreement,
                                validate_images=collect_images(validate_data) if validate_data else [])
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
def build(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by noop-rt export --fp16.")],
    out: Annotated[Path | None, typer.Option("--out", help="Engine folder (default engines/NAME).")] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Reused across builds.")] = None,
    optimization_level: Annotated[int, typer.Option("--optimization-level", min=0, max=5)] = 3,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the engines match.")] = False,
) -> None:
    """Build TensorRT FP16 engines for a bundle (needs TensorRT and an NVIDIA GPU)."""
    def go() -> None:
        from noop_rt.engines import BuildOptions, build_engines

        record = build_engines(bundle, BuildOptions(out=out, timing_cache=timing_cache,
                                                    optimization_level=optimization_level, force=force))
        print(f"engines ready for {bundle}: TensorRT {record.get('tensorrt')} on {record.get('gpu')}")

    _run(go)


@app.command()
def batch(
    inputs: Annotated[list[str], typer.Argument(help="Images, folders, globs, or .txt/.parquet lists of paths.",
                                                show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="FILE.parquet or FILE.jsonl (resumes if it exists).")],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, classes: ClassesOpt = None,
    template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = 100,
    loss: LossOpt = None, top_k: Annotated[int, typer.Option("--top-k", min=1)] = 5,
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data: a local cluster, or `--ray ADDRESS` "
                                      "(auto, ray://host:port, host:port) / RAY_ADDRESS for an existing one.")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Same as --ray ADDRESS.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray actors (one model copy each).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0)] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per classification call.")] = 16,
    device: DeviceOpt = "auto", max_batch: MaxBatchOpt = 256, engines: EnginesOpt = None, as_json: JsonOpt = False,
) -> None:
    """Classify many images into a parquet/jsonl file, in process or on a Ray cluster; resumable."""
    def go() -> None:
        from noop_rt.batch import BatchOptions, run_batch

        req = _request(bundle, ckpt, model, backend, classes, None, template, device, max_batch, engines=engines)
        options = BatchOptions(method=method, noises=noises, loss=loss, top_k=top_k, batch_size=batch_size,
                               ray=ray or ray_address is not None, ray_address=ray_address, workers=workers,
                               gpus_per_worker=gpus_per_worker)
        report = run_batch(inputs, out, req, options)
        summary = {"out": str(report.out), "total": report.total, "skipped": report.skipped,
                   "classified": report.classified, "failed": report.failed, "seconds": round(report.seconds, 2),
                   "images_per_s": round(report.images_per_s, 2), "backend": report.backend, "mode": report.mode}
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
    backbone: Annotated[str, typer.Option("--backbone", help="'ckpt' (the bundle/ckpt/demo model) or 'sd15-shape' "
                                          "(SD-1.5 architecture, random weights, 512 px).")] = "ckpt",
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="Classes for sd15-shape.")] = 37,
    baseline_noises: Annotated[int, typer.Option("--baseline-noises", min=1)] = 100,
    measured_pairs: Annotated[int, typer.Option("--measured-pairs", min=1, help="Baseline pairs actually timed; "
                                                "the rest extrapolated (labelled).")] = 10,
    backends: Annotated[str, typer.Option("--backends", help="Comma-separated: torch,onnxruntime,tensorrt")] =
        "torch,onnxruntime",
    images: Annotated[Path | None, typer.Option("--images", help="Folder of images to time on.")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed images per backend.")] = 10,
    device: DeviceOpt = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="Half precision (torch on CUDA; fp16 bundle for sd15-shape).")]
        = False,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Where sd15-shape models/bundles are kept.")] =
        Path("~/.cache/noop-rt"),
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON to FILE.")] = None,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Write a latency bar chart (PNG).")] = None,
    engines: EnginesOpt = None,
) -> None:
    """Latency/throughput of NoOp vs the N-noise baseline per backend, measured in one run."""
    def go() -> None:

        from noop_rt.bench import (
            SD15_UNET_GFLOP,
            BenchOptions,
            bench_setup,
            format_table,
            plot,
            run_bench,
            unet_gflop,
            unet_gflop_from_source,
        )

        wanted = [b.strip() for b in backends.split(",") if b.strip()]
        classifiers, arrays = bench_setup(wanted, backbone, bundle, ckpt, images, num_classes, cache_dir, device,
                                          fp16, engines)
        first = next(iter(classifiers.values()))
        if "torch" in classifiers:
            bb = classifiers["torch"].backend.backbone
            gflop = unet_gflop(bb.unet, bb.latent_shape, bb.max_tokens, int(first.emb.shape[-1]))
        else:  # only bundle backends: count from the bundle's backbone config
            gflop = unet_gflop_from_source(str(first.backend.bundle.manifest["backbone"]["source"]))
        options = BenchOptions(backends=wanted, baseline_noises=baseline_noises,
                               baseline_measured_pairs=measured_pairs, runs=runs, device=device, fp16=fp16)
        report = run_bench(classifiers, arrays, options, gflop, backbone)
        if backbone == "sd15-shape":
            report["reference_unet_gflop"] = SD15_UNET_GFLOP
        print(format_table(report))
        if json_file is not None:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            json_file.write_text(json.dumps(report, indent=2) + "\n")
        if plot_file is not None:
            plot(report, plot_file)

    _run(go)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write train/ val/ test/ image-folder trees into.")],
    shots: Annotated[int, typer.Option("--shots", min=1)] = SHOTS,
    val_shots: Annotated[int, typer.Option("--val-shots", min=1)] = VAL_SHOTS,
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
def demo(
    backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = 100, as_json: JsonOpt = False,
) -> None:
    """Classify the bundled example digits with the built-in demo and print a table."""
    def go() -> None:
        from noop_rt.demo import EXAMPLES_DIR
        from noop_rt.runtime.loader import Request

        images = sorted(EXAMPLES_DIR.glob("*.png"))
        if not images:
            raise BadInputError(f"no example images in {EXAMPLES_DIR}")
        _classify(images, Request(backend=backend), method, noises, None, 0, 3, as_json, truth_table=True)

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
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
