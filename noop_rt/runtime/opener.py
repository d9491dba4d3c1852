"""One opener: source -> backend -> classifier, with no import cycle.

The source's kind (one table) says which backends can run it: a bundle runs on TensorRT, onnxruntime (CUDA or CPU)
or OpenVINO; a checkpoint or a diffusers folder on torch. `auto` is an ordered probe that records why each backend
was skipped; an explicit backend turns its reason into the error. Backends are imported only when chosen, so a bundle
never imports torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.runtime.backends.base import ROBUST_NEEDS_TORCH, installed, nvidia_gpus
from noop_rt.runtime.choices import BACKENDS, SOURCE_KINDS
from noop_rt.runtime.classes import DEFAULT_TEMPLATE, make_prompts, parse_class_list, read_prompts_file
from noop_rt.runtime.classifier import Classifier, ClassSet
from noop_rt.runtime.errors import BadInputError, MissingDependencyError, UsageError
from noop_rt.runtime.extras import install_hint, require_torch_side
from noop_rt.runtime.graph_model import GraphModel, ModelInfo
from noop_rt.runtime.strategies import OPTIONS
from noop_rt.runtime.suggest import close_match, suggest, unexpected_keyword

TORCH_MAX_BATCH = 256
SOURCE_DESCRIPTION = "a bundle folder (manifest.json), a checkpoint NAME.pt, a diffusers Stable Diffusion folder " \
                     "(model_index.json), or 'demo'"


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """What to open and how: the one description that the CLI, `batch` (in process and on Ray workers), `eval`,
    `bench` and the server build and hand to `noop_rt.load`. Plain data (it travels to Ray actors); fields are
    normalised when it is made (`classes` may be "a,b,c", `prompts` a CSV file, paths strings).

    Class options: `classes` (names), `template` (one '{}'), `prompts` ({class: prompt}, e.g. from Li et al.'s CSV
    files); `classes_from` names where `classes` came from when they must be the trained set (`--data DIR`)."""

    source: str | Path | None = None  # a bundle folder, a checkpoint NAME.pt, a diffusers folder, "demo"/None: demo
    kind: str | None = None  # what the user said the source is (--bundle/--ckpt/--model); None: detect it
    backend: str = "auto"
    device: str = "auto"  # auto | cpu | cuda[:N]
    fp16: bool = False  # torch backend: the backbone in half precision
    max_batch: int | None = None  # largest UNet batch per call; None: a bundle's own (sized at export to fit memory
    # and the TensorRT profile), 256 on torch
    threads: int | None = None  # CPU engine threads (None: the engine's default)
    engines: Path | None = None  # TensorRT engine folder (default engines/<bundle name>)
    classes: list[str] | None = None
    template: str | None = None
    prompts: dict[str, str] | None = None
    classes_from: str | None = None
    method: str | None = None
    # loss, pairs, stages, seed, alpha, round_size, max_pairs, noises, robust (None values dropped)
    strategy: dict[str, Any] = field(default_factory=dict, compare=False)
    lora: Path | None = None  # a LoRA .safetensors fused into a diffusers folder / a checkpoint's backbone (torch)
    lora_scale: float | None = None  # None: 1, or the scale a checkpoint was trained with

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.classes, str):
            put("classes", parse_class_list(self.classes))
        elif self.classes is not None:
            put("classes", list(self.classes))
        if isinstance(self.prompts, (str, Path)):
            put("prompts", read_prompts_file(self.prompts))
        for name in ("engines", "lora"):
            if getattr(self, name) is not None:
                put(name, Path(getattr(self, name)))
        if self.kind is not None and self.kind not in SOURCE_KINDS:
            raise suggest(self.kind, SOURCE_KINDS, "source kind")
        unknown = [k for k in self.strategy if k not in OPTIONS]
        if unknown:
            raise unexpected_keyword("load()", unknown[0], OPTIONS)
        noises = self.strategy.get("noises")
        if noises is not None and not isinstance(noises, np.ndarray):
            raise TypeError(f"noises takes a noise bank, an array (pairs, c, h, w), not {type(noises).__name__}; "
                            "for a number of (t, eps) pairs use pairs=N")
        put("strategy", {k: v for k, v in self.strategy.items() if v is not None})

    @classmethod
    def of(cls, source: str | Path | None = None, **options: Any) -> LoadOptions:
        """From `noop_rt.load`'s keywords (see `updated`)."""
        return cls(source=source).updated(**options)

    def updated(self, **options: Any) -> LoadOptions:
        """A copy with fields changed by keyword: the fields above, and strategy options (loss, pairs, stages, seed,
        alpha, round_size, max_pairs, noises, robust) merged into `strategy`. An unknown keyword is a TypeError
        naming the closest known one."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = [k for k in options if k not in fields and k not in OPTIONS]
        if unknown:
            raise unexpected_keyword("load()", unknown[0], [*(fields - {"strategy"}), *OPTIONS])
        strategy = {**self.strategy, **options.pop("strategy", {}),
                    **{k: options.pop(k) for k in list(options) if k in OPTIONS}}
        return dataclasses.replace(self, strategy=strategy, **options)


def source_kind(source: str | Path | None) -> tuple[str, Path | None]:
    """("demo" | "bundle" | "checkpoint" | "diffusers", path)."""
    if source is None or str(source) == "demo":
        return "demo", None
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return "bundle", path
        if (path / "model_index.json").is_file():
            return "diffusers", path
        raise BadInputError(f"{path} is neither a noop-rt bundle (manifest.json) nor a diffusers folder "
                            f"(model_index.json); load {SOURCE_DESCRIPTION}")
    if path.suffix == ".pt":
        if not path.is_file():
            raise BadInputError(f"checkpoint not found: {path}")
        return "checkpoint", path
    if not path.exists():
        raise BadInputError(f"not found: {path} (load {SOURCE_DESCRIPTION})")
    raise BadInputError(f"cannot load {path}: expected {SOURCE_DESCRIPTION}")


def open_classifier(options: LoadOptions) -> Classifier:
    """The classifier `options.source` names; the built-in demo when there is none. `noop_rt.load` is the door:
    nothing else calls this."""
    source = options.source
    if options.backend not in BACKENDS:
        raise suggest(options.backend, BACKENDS, "backend")
    check_device(options.device)
    if options.kind is not None and source is not None and str(source) != "demo":
        kind, path = options.kind, Path(source).expanduser()
    elif options.kind == "diffusers" and str(source) == "demo":
        kind, path = "diffusers", Path("demo")
    else:
        kind, path = source_kind(source)
    notes: list[str] = []
    if kind == "demo":
        from noop_rt.demo import BUNDLE_DIR, CKPT_PATH

        if options.backend == "torch" or options.strategy.get("robust") is not None:
            kind, path = "checkpoint", CKPT_PATH
        else:
            kind, path = "bundle", BUNDLE_DIR
    if options.lora_scale is not None and options.lora is None and kind != "checkpoint":
        raise UsageError("--lora-scale needs --lora FILE (or a checkpoint trained with a LoRA)")
    if options.lora is not None and kind not in ("checkpoint", "diffusers"):
        raise UsageError("--lora applies to a diffusers folder (--model DIR) or a checkpoint (--ckpt NAME.pt); "
                         + ("a bundle carries the LoRA it was exported with, fused into its graphs"
                            if kind == "bundle" else "the built-in demo takes none"))
    if kind == "bundle":
        model, trained_emb = _open_bundle(path, options, notes)
    else:
        model, trained_emb = _open_torch(kind, path, options)
    class_set = resolve_classes(model, trained_emb, options, notes)
    model = model.with_classes(class_set.embeddings, class_set.trained)
    classifier = Classifier(model, class_set, method=options.method, options=options.strategy, notes=notes)
    model.prepare(classifier.method)
    info = model.info
    if info.tau is not None and classifier.method == "noop" and not classifier.calibrated("noop", classifier.config()):
        notes.append(f"probabilities are uncalibrated (a per-image 1/std scale): tau was fitted for the trained "
                     f"classes and the {info.loss} loss")
    return classifier


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    if not DEVICE.match(device):
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------------------------- bundles
def _open_bundle(path: Path, options: LoadOptions, notes: list[str]) -> tuple[GraphModel, np.ndarray]:
    from noop_rt.runtime.bundle import Bundle

    if options.backend == "torch":
        raise UsageError("the torch backend runs checkpoints and diffusers folders; pass the bundle's checkpoint "
                         "(NAME.pt) or choose --backend onnxruntime/openvino/tensorrt")
    if options.strategy.get("robust") is not None:
        raise UsageError(f"{ROBUST_NEEDS_TORCH} instead of the bundle")
    bundle = Bundle.open(path)
    runner = _bundle_runner(bundle, options, notes)
    info = ModelInfo.from_manifest(bundle.manifest, str(path))
    executes = runner.execution_precision
    if executes not in (None, "f32") and info.precision == "fp32":
        notes.append(f"OpenVINO runs this fp32 bundle in {executes} (its default on this CPU); "
                     "NOOP_RT_OPENVINO_PRECISION=f32 keeps it in fp32")
    if options.max_batch is not None:  # TensorRT plans cannot run past their profile; the others may
        info.max_batch = min(info.max_batch, options.max_batch) if runner.name == "tensorrt" else options.max_batch

    return GraphModel(runner, info, bundle.tokenize), bundle.class_embeddings()


def _bundle_runner(bundle: Any, options: LoadOptions, notes: list[str]) -> Any:
    """The first backend of the probe that can run the bundle (or the one asked for, or why not)."""
    wanted = options.backend
    device = options.device
    cpu_only = device == "cpu"
    reasons: dict[str, str] = {}
    for name in ("tensorrt", "onnxruntime-cuda", "onnxruntime", "openvino"):
        family = name.split("-")[0]
        if wanted not in ("auto", family):
            continue
        if name in ("tensorrt", "onnxruntime-cuda") and cpu_only:
            reasons[name] = "--device cpu"
            continue
        if name == "openvino" and device.startswith("cuda"):
            reasons[name] = f"--device {device}"
            continue
        if name == "onnxruntime" and device.startswith("cuda") and wanted == "auto":
            continue  # a GPU was asked for: only the GPU runners qualify
        why = _why_not(name, bundle, options)
        if why is None:
            if name == "onnxruntime" and reasons.get("onnxruntime-cuda", "").startswith("this onnxruntime has no "
                                                                                       "CUDA"):
                notes.append("an NVIDIA GPU is present but onnxruntime has no CUDA provider, so the bundle runs on "
                             "the CPU: " + reasons["onnxruntime-cuda"])
            return _make_runner(name, bundle, options)
        reasons[name] = why
        if name == "onnxruntime-cuda" and wanted == "onnxruntime" and device.startswith("cuda"):
            raise MissingDependencyError(f"--backend onnxruntime --device {device}: {why}")
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise MissingDependencyError(f"no backend can run {bundle.root} here ({detail})" if wanted == "auto"
                                 else f"--backend {wanted} cannot run here: {detail}")


def _why_not(name: str, bundle: Any, options: LoadOptions) -> str | None:
    if name == "tensorrt":
        from noop_rt.runtime.backends import tensorrt_plans

        return tensorrt_plans.unavailable(bundle, options.engines, options.device)
    if name == "onnxruntime-cuda":
        from noop_rt.runtime.backends import onnxruntime_runner

        return onnxruntime_runner.cuda_unavailable() if nvidia_gpus() or options.device.startswith("cuda") \
            else "no NVIDIA GPU"
    if name == "openvino":
        return None if installed("openvino") else f"openvino is not installed ({install_hint('openvino')})"
    from noop_rt.runtime.backends import onnxruntime_runner

    return onnxruntime_runner.unavailable()


def _make_runner(name: str, bundle: Any, options: LoadOptions) -> Any:
    device = options.device if options.device.startswith("cuda") else "cuda:0"
    if name == "tensorrt":
        from noop_rt.runtime.backends.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(bundle, options.engines, device)
    if name == "openvino":
        from noop_rt.runtime.backends.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(bundle, threads=options.threads)
    from noop_rt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

    return OnnxRuntimeRunner(bundle, device if name == "onnxruntime-cuda" else "cpu", options.threads)


# ---------------------------------------------------------------------------------------------- torch sources
def _open_torch(kind: str, path: Path | None, options: LoadOptions) -> tuple[GraphModel, np.ndarray | None]:
    if options.backend not in ("auto", "torch"):
        raise UsageError(f"--backend {options.backend} runs exported bundles; a {kind} runs on the torch backend "
                         f"(export it first: noop-rt export --ckpt NAME.pt)" if kind == "checkpoint" else
                         f"--backend {options.backend} runs exported bundles; a {kind} folder runs on torch")
    require_torch_side("--backend torch" if options.backend == "torch"
                       else f"a {kind} runs on the torch backend (or export it to a bundle where torch is), which")
    from noop_rt.runtime.backends import torch_runner

    torch_runner.set_threads(options.threads)

    if kind == "checkpoint":
        runner, info, emb = torch_runner.open_checkpoint(path, None, options.device, options.fp16,
                                                          options.max_batch or TORCH_MAX_BATCH, options.lora,
                                                          options.lora_scale)
        return GraphModel(runner, info, torch_runner.tokenizer_of(runner.backbone)), emb
    runner, info = torch_runner.open_diffusers(str(path), options.device, options.fp16,
                                                options.max_batch or TORCH_MAX_BATCH, options.lora,
                                                options.lora_scale)
    return GraphModel(runner, info, torch_runner.tokenizer_of(runner.backbone)), None


# ---------------------------------------------------------------------------------------------- classes
def resolve_classes(model: GraphModel, trained_emb: np.ndarray | None, options: LoadOptions,
                    notes: list[str]) -> ClassSet:
    """The class set to label with: the trained one (cached embeddings, calibrated tau), or new prompts embedded
    through the text encoder (zero-shot; the learned noise is class-agnostic)."""
    info = model.info
    trained = dict(zip(info.classes or [], info.prompts or [], strict=True))
    names, prompts = _requested(info, options)
    notes.extend(getattr(options.prompts, "notes", []))  # what reading the prompts file called for
    if names is None:  # the trained set
        return ClassSet(list(trained), list(trained.values()), trained_emb, trained=True)
    if trained and dict(zip(names, prompts, strict=True)) == trained:
        return ClassSet(list(trained), list(trained.values()), trained_emb, trained=True)
    if options.classes_from is not None and trained and set(names) != set(trained):
        from noop_rt.runtime.classes import describe_unknown

        extra = sorted(set(names) - set(trained))
        missing = sorted(set(trained) - set(names))
        raise BadInputError(f"the class folders of {options.classes_from} do not match the trained classes"
                            f"{': unknown ' + describe_unknown(extra, list(trained)) if extra else ''}"
                            f"{'; missing ' + ', '.join(missing[:5]) if missing else ''} "
                            "(pass --classes a,b,c to classify with new class prompts)")
    if info.prompt_tuned:
        raise BadInputError("this model's class embeddings are prompt-tuned; new classes or prompts need "
                            "re-training (drop --classes/--prompts/--template, or train without --prompt-tuning)")
    zero_shot = [n for n, p in zip(names, prompts, strict=True) if trained.get(n) != p] if trained else []
    for name in zero_shot:
        if name not in trained and (close := close_match(name, list(trained))) is not None:
            notes.append(f"{name!r} is not a trained class (did you mean {close!r}?); it is classified zero-shot "
                         f"from its prompt {dict(zip(names, prompts, strict=True))[name]!r}")
    if zero_shot:
        notes.append(f"zero-shot (untrained) prompts for {', '.join(zero_shot[:5])}"
                     f"{' ...' if len(zero_shot) > 5 else ''}")
    rows = []
    todo = [i for i, (n, p) in enumerate(zip(names, prompts, strict=True)) if trained.get(n) != p]
    if todo and not model.can_embed:
        new_names = [names[i] for i in todo]
        raise BadInputError(f"{info.name} was exported without its text encoder (--no-text-encoder): it classifies "
                            f"its trained classes ({', '.join(list(trained)[:5])}{' ...' if len(trained) > 5 else ''})"
                            f" only, and {', '.join(map(repr, new_names[:3]))}{' ...' if len(new_names) > 3 else ''} "
                            "need the encoder to embed their prompts: re-export without --no-text-encoder")
    new = model.embed([prompts[i] for i in todo]) if todo else None
    order = list(trained)
    for i, name in enumerate(names):
        rows.append(new[todo.index(i)] if i in todo else trained_emb[order.index(name)])
    return ClassSet(names, prompts, np.ascontiguousarray(np.stack(rows), dtype=np.float32), trained=False,
                    zero_shot=zero_shot)


def _requested(info: ModelInfo, options: LoadOptions) -> tuple[list[str] | None, list[str] | None]:
    """The class names and prompts the options ask for, or (None, None) for the trained set."""
    from noop_rt.demo import DEMO_TEMPLATE, DIGIT_NAMES

    template = options.template
    if options.prompts is not None:
        table = options.prompts
        names = options.classes or list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            raise BadInputError(f"the prompts file has no prompt for class(es) {', '.join(unknown[:5])}")
        if template is not None:
            raise UsageError("pass either --prompts FILE or --template, not both")
        return names, [table[n] for n in names]
    if options.classes is None and template is None:
        if info.classes:
            return None, None
        if info.source == "diffusers" and info.location == "demo":
            return list(DIGIT_NAMES), make_prompts(list(DIGIT_NAMES), DEMO_TEMPLATE)
        raise BadInputError("no classes given: pass --classes a,b,c, --prompts FILE or --data DIR (one sub-folder "
                            "per class)")
    names = options.classes or list(info.classes or [])
    if not names:
        raise BadInputError("no classes given: pass --classes a,b,c or --data DIR")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInputError(f"duplicate class names: {', '.join(duplicates)}")
    return names, make_prompts(names, template or info.template or DEFAULT_TEMPLATE)
