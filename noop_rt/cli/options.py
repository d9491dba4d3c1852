"""Options shared by the commands, and the steps every model command takes: the source flags -> `LoadOptions` ->
`noop_rt.load`. Arguments and inputs are checked before any model is opened."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from noop_rt.runtime.choices import BACKENDS, LOSSES, METHODS
from noop_rt.runtime.errors import BadInputError, UsageError

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
                                               "pruned | cascade (default: noop when a learned noise is loaded, "
                                               "else baseline).")]
CascadeThresholdOpt = Annotated[float | None, typer.Option("--cascade-threshold", min=0.0, max=1.0, metavar="P",
                                                           help="cascade: answer with NoOp when its top-1 "
                                                                "probability reaches P (default: the value fitted at "
                                                                "train).")]
ShortlistOpt = Annotated[int | None, typer.Option("--shortlist", min=2, metavar="K", help="cascade: at most K classes "
                                                  "go on to the escalation (default: fitted at train).")]
EscalateOpt = Annotated[str | None, typer.Option("--escalate", metavar="NAME", help="cascade: pruned | adaptive | "
                                                 "baseline for the images NoOp is unsure of (default: fitted at "
                                                 "train).")]
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
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, metavar="N", help="Engine threads per "
                                               "classification call in flight (default: measured per engine, "
                                               "one per core split between the calls; recorded in --json).")]
ConcurrencyOpt = Annotated[int | None, typer.Option("--concurrency", min=1, metavar="K", help="Classification "
                                                    "calls in flight at once (default: measured per engine, one "
                                                    "per core on onnxruntime and OpenVINO CPU, 1 on a GPU).")]
RobustOpt = Annotated[bool, typer.Option("--robust", help="RDC likelihood maximisation first (torch backend).")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="torch backend in half precision.")]
LoraOpt = Annotated[Path | None, typer.Option("--lora", metavar="FILE", help="A LoRA .safetensors (diffusers or "
                                              "kohya keys) fused into the --model SD folder; with --ckpt, where the "
                                              "one it was trained with moved to.")]
LoraScaleOpt = Annotated[float | None, typer.Option("--lora-scale", metavar="X", help="LoRA strength (default 1, or "
                                                    "the checkpoint's).")]


def source_of(bundle: Path | None, ckpt: Path | None, model: str | None) -> tuple[str | Path | None, str | None]:
    """(the source, its kind as the user named it)."""
    given = [(x, kind) for x, kind in ((bundle, "bundle"), (ckpt, "checkpoint"), (model, "diffusers"))
             if x is not None]
    if len(given) > 1:
        raise BadInputError("pass one of --bundle, --ckpt and --model")
    return given[0] if given else (None, None)


def check_choices(backend: str, method: str | None, loss: str | None) -> None:
    from noop_rt.runtime.suggest import suggest

    if backend not in BACKENDS:
        raise suggest(backend, BACKENDS, "backend")
    if method is not None and method not in METHODS:
        raise suggest(method, METHODS, "method")
    if loss is not None and loss not in LOSSES:
        raise suggest(loss, LOSSES, "loss")


def strategy_options(noises: int | None, stages: str | None, loss: str | None, seed: int,
                     robust: bool, cascade_threshold: float | None = None, shortlist: int | None = None,
                     escalate: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"seed": seed}
    if escalate is not None:
        from noop_rt.runtime.choices import ESCALATIONS
        from noop_rt.runtime.suggest import suggest

        if escalate not in ESCALATIONS:
            raise suggest(escalate, ESCALATIONS, "escalation strategy")
    for name, value in (("cascade_threshold", cascade_threshold), ("shortlist", shortlist), ("escalate", escalate)):
        if value is not None:
            options[name] = value
    if noises is not None:
        options["pairs"] = noises
    if loss is not None:
        options["loss"] = loss
    if stages is not None:
        from noop_rt.runtime.strategies import PUBLISHED_LOSS, PUBLISHED_STAGES, parse_stages

        try:
            options["stages"] = parse_stages(stages)
        except ValueError as exc:
            raise UsageError(f"--stages: {exc}") from None
        if stages.strip().lower() in PUBLISHED_STAGES:  # a named setting brings its whole setting, said once
            options.setdefault("loss", PUBLISHED_LOSS)
            schedule = ",".join(f"{p}:{k}" for p, k in options["stages"])
            print(f"note: --stages {stages.strip()} is Li et al.'s setting: stages {schedule}, loss "
                  f"{options['loss']}" + ("" if loss else " (--loss overrides it)"), file=sys.stderr)
    if robust:
        from noop_rt.train.robust import RobustConfig

        options["robust"] = RobustConfig(seed=seed)
    return options


def load_request(bundle: Path | None = None, ckpt: Path | None = None, model: str | None = None, *,
                 backend: str = "auto", device: str = "auto", method: str | None = None,
                 classes: str | list[str] | None = None, prompts: Path | None = None, template: str | None = None,
                 noises: int | None = None, stages: str | None = None, loss: str | None = None, seed: int = 0,
                 cascade_threshold: float | None = None, shortlist: int | None = None, escalate: str | None = None,
                 robust: bool = False, max_batch: int | None = None, fp16: bool = False, engines: Path | None = None,
                 classes_from: str | None = None, lora: Path | None = None, lora_scale: float | None = None) -> Any:
    """The `LoadOptions` a command's flags describe (names checked, the source flags and the strategy flags
    gathered): what `noop_rt.load` opens, here, in batch workers and in server replicas."""
    from noop_rt.api import LoadOptions

    check_choices(backend, method, loss)
    path, kind = source_of(bundle, ckpt, model)
    return LoadOptions.of(path, kind=kind, backend=backend, device=device, fp16=fp16, max_batch=max_batch,
                          engines=engines, classes=classes, template=template, prompts=prompts,
                          classes_from=classes_from, method=method, lora=lora, lora_scale=lora_scale,
                          **strategy_options(noises, stages, loss, seed, robust, cascade_threshold,
                                             shortlist, escalate))


def open_model(request: Any) -> Any:
    """`noop_rt.load(request)`, with drift warnings and the loader's notes on stderr."""
    from noop_rt.api import load

    classifier = load(request)
    classifier.report_to(sys.stderr)
    return classifier


def check_images(images: list[Path]) -> None:
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


