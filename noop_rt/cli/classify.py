"""`noop-rt classify` and `noop-rt eval`: label images, score a labelled folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from noop_rt.cli.main import app, guarded
from noop_rt.cli.options import (
    BackendOpt,
    BundleOpt,
    CascadeThresholdOpt,
    CkptOpt,
    ClassesOpt,
    ConcurrencyOpt,
    DeviceOpt,
    EnginesOpt,
    EscalateOpt,
    Fp16Opt,
    JsonOpt,
    LoraOpt,
    LoraScaleOpt,
    LossOpt,
    MaxBatchOpt,
    MethodOpt,
    ModelOpt,
    NoisesOpt,
    PromptsOpt,
    RobustOpt,
    SeedOpt,
    ShortlistOpt,
    StagesOpt,
    TemplateOpt,
    ThreadsOpt,
    TopKOpt,
    check_choices,
    check_images,
    load_request,
    open_model,
)


# ---------------------------------------------------------------------------------------------- classify / eval
def print_results(images: list[Path], classifier: Any, top_k: int, as_json: bool, truth_table: bool = False) -> None:
    from tqdm import tqdm

    with tqdm(total=len(images), desc="classify", unit="img", file=sys.stderr, disable=len(images) < 32,
              leave=False) as bar:
        results = classifier.classify([str(p) for p in images], top_k=top_k, progress=bar.update)
        bar.refresh()  # the final count is drawn even when the last updates came within tqdm's redraw interval
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    elif truth_table:
        print_truth_table(results)
    else:
        for r in results:
            rest = ", ".join(f"{t.label} {t.prob:.2f}" for t in r.top[1:])
            print(f"{r.image}: {r.label} ({r.prob:.2f})" + (f"  | {rest}" if rest else ""))
    for r in results:
        for warning in r.warnings:
            print(f"warning: {r.image}: {warning}", file=sys.stderr)
    print(classifier.speed_line(results), file=sys.stderr)


def print_truth_table(results: list[Any]) -> None:
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
    stages: StagesOpt = None, cascade_threshold: CascadeThresholdOpt = None,
    shortlist: ShortlistOpt = None, escalate: EscalateOpt = None, loss: LossOpt = None, seed: SeedOpt = 0,
    top_k: TopKOpt = 5, device: DeviceOpt = "auto",
    fp16: Fp16Opt = False, max_batch: MaxBatchOpt = None, robust: RobustOpt = False, engines: EnginesOpt = None,
    lora: LoraOpt = None, lora_scale: LoraScaleOpt = None, as_json: JsonOpt = False,
) -> None:
    """Classify images. No --bundle/--ckpt/--model: the built-in demo (handwritten digits)."""
    def go() -> None:
        from noop_rt.runtime.classes import ImageFolder

        check_choices(backend, method, loss)
        check_images(images)
        request = load_request(bundle, ckpt, model, backend=backend, device=device, method=method, classes=classes,
                               prompts=prompts, template=template, noises=noises, stages=stages,
                               cascade_threshold=cascade_threshold, shortlist=shortlist,
                               escalate=escalate, loss=loss, seed=seed,
                               robust=robust, max_batch=max_batch, fp16=fp16, engines=engines, lora=lora,
                               lora_scale=lora_scale)
        if classes is None and data is not None:
            request = request.updated(classes=ImageFolder.scan(data).classes, classes_from=f"--data {data}")
        classifier = open_model(request)
        print_results(images, classifier, top_k, as_json)

    guarded(go)


@app.command("eval")
def eval_command(
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="Image-folder tree: DIR/<class>/<images>.")],
    bundle: BundleOpt = None, ckpt: CkptOpt = None, model: ModelOpt = None, prompts: PromptsOpt = None,
    template: TemplateOpt = None, backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = None,
    stages: StagesOpt = None, cascade_threshold: CascadeThresholdOpt = None,
    shortlist: ShortlistOpt = None, escalate: EscalateOpt = None, loss: LossOpt = None, seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    fp16: Fp16Opt = False, max_batch: MaxBatchOpt = None, robust: RobustOpt = False, engines: EnginesOpt = None,
    lora: LoraOpt = None, lora_scale: LoraScaleOpt = None, threads: ThreadsOpt = None,
    concurrency: ConcurrencyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Accuracy, per-class accuracy and confusion matrix on a labelled image folder; --json records the protocol."""
    def go() -> None:
        from noop_rt.jobs.evaluate import evaluate_folder
        from noop_rt.runtime.classes import ImageFolder

        check_choices(backend, method, loss)
        dataset = ImageFolder.scan(data)
        zero_shot_model = model is not None and model != "demo"
        from noop_rt.jobs.parallel import open_classifiers, plan

        request = load_request(
            bundle, ckpt, model, backend=backend, device=device, method=method,
            classes=dataset.classes if zero_shot_model and prompts is None else None, prompts=prompts,
            template=template, noises=noises, stages=stages, cascade_threshold=cascade_threshold, shortlist=shortlist,
            escalate=escalate, loss=loss, seed=seed, robust=robust, max_batch=max_batch,
            fp16=fp16, engines=engines, lora=lora, lora_scale=lora_scale)
        first = open_model(request)
        engine = plan(first.backend, first.device, threads, concurrency)
        pool = open_classifiers(request, first, engine)
        try:
            report = evaluate_folder(pool[0], dataset, classifiers=pool, engine=engine)
        finally:
            for c in pool:
                c.close()
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

    guarded(go)


