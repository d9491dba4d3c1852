"""Turn CLI-level choices (--bundle / --ckpt / --model / the built-in demo, --backend, --classes) into a Classifier."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from noop_rt.backbone import DEMO_SOURCE, load_backbone
from noop_rt.checkpoint import load_checkpoint, same_backbone
from noop_rt.configs import DEMO_TEMPLATE, DIGIT_NAMES
from noop_rt.data import DEFAULT_TEMPLATE, describe_unknown, make_prompts
from noop_rt.errors import BadInputError, CheckpointError, UsageError
from noop_rt.runtime.base import BACKENDS
from noop_rt.runtime.classifier import Classifier, ClassSpec


def suggest(value: str, choices: list[str] | tuple[str, ...], what: str) -> UsageError:
    """A one-line usage error for an unknown value, with the closest valid one."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"unknown {what} {value!r}{hint}; choose one of {', '.join(choices)}")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda asked for, but torch sees no CUDA GPU")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadInputError(f"unknown device {device!r} (use auto, cpu or cuda[:N])") from None


@dataclass
class Request:
    """Where the model comes from and how to run it."""

    bundle: Path | None = None
    ckpt: Path | None = None
    model: str | None = None  # a diffusers folder, or "demo"
    backend: str = "auto"
    classes: list[str] | None = None  # override / provide the class list
    template: str | None = None
    device: str = "auto"
    fp16: bool = False  # torch backend: run the backbone in half precision (CUDA)
    max_batch: int = 256
    engines: Path | None = None  # TensorRT engine folder (default engines/<bundle name>)
    classes_from: str | None = None  # where `classes` came from, e.g. "--data DIR" (must match a trained class set)


def _with_classes(spec: ClassSpec, req: Request, prompt_tuned: bool) -> ClassSpec:
    """The trained class set, or new class prompts (`--classes`: the learned noise is class-agnostic) embedded with
    the checkpoint's template. Class folders (`--data`) must name the trained classes."""
    classes, template = req.classes, req.template
    if classes is None or (set(classes) == set(spec.classes) and template is None):
        return spec
    if req.classes_from is not None and set(classes) != set(spec.classes):
        extra = sorted(set(classes) - set(spec.classes))
        missing = sorted(set(spec.classes) - set(classes))
        raise BadInputError(f"the class folders of {req.classes_from} do not match the trained classes"
                            f"{': unknown ' + describe_unknown(extra, spec.classes) if extra else ''}"
                            f"{'; missing ' + ', '.join(missing[:5]) if missing else ''} "
                            "(pass --classes a,b,c to classify with new class prompts)")
    if prompt_tuned:
        raise BadInputError("this checkpoint's class embeddings are prompt-tuned; new classes need re-training "
                            "(drop --classes/--data, or train without --prompt-tuning)")
    template = template or spec.template or DEFAULT_TEMPLATE
    return ClassSpec(classes, make_prompts(classes, template), None, spec.tau, spec.t_star, spec.loss, template)


def open_classifier(req: Request) -> Classifier:
    """Build the classifier a request names; the built-in demo when no bundle, ckpt or model is given."""
    if req.backend not in BACKENDS:
        raise suggest(req.backend, BACKENDS, "backend")
    if sum(x is not None for x in (req.bundle, req.ckpt)) > 1:
        raise BadInputError("pass either --bundle or --ckpt, not both")
    if req.bundle is not None:
        from noop_rt.runtime.bundle_loader import open_bundle_classifier

        return open_bundle_classifier(req)
    if req.ckpt is None and req.model is None:
        from noop_rt.demo import BUNDLE_DIR, CKPT_PATH

        if req.backend in ("auto", "onnxruntime", "tensorrt") and (BUNDLE_DIR / "manifest.json").is_file():
            from noop_rt.runtime.bundle_loader import open_bundle_classifier

            return open_bundle_classifier(Request(**{**req.__dict__, "bundle": BUNDLE_DIR}))
        if CKPT_PATH.is_file():
            req = Request(**{**req.__dict__, "ckpt": CKPT_PATH})
        else:
            req = Request(**{**req.__dict__, "model": DEMO_SOURCE})
    if req.backend not in ("auto", "torch"):
        raise BadInputError(f"--backend {req.backend} needs an exported bundle (--bundle DIR); "
                            "checkpoints and model folders run on the torch backend")
    from noop_rt.runtime.torch_backend import TorchBackend

    device = pick_device(req.device)
    dtype = torch.float16 if req.fp16 else torch.float32
    if req.ckpt is not None:
        ckpt = load_checkpoint(req.ckpt)
        backbone = load_backbone(req.model or ckpt.backbone_source, dtype=dtype, device=device)
        reason = same_backbone(ckpt.backbone_fingerprint, backbone)
        if reason is not None:
            raise CheckpointError(f"{req.ckpt} was trained on another backbone than {backbone.source}: {reason}")
        spec = ClassSpec.from_checkpoint(ckpt)
        spec = _with_classes(spec, req, ckpt.prompt_ctx is not None)
        return Classifier(TorchBackend(backbone, ckpt.noise_model()), spec, req.max_batch)
    backbone = load_backbone(req.model, dtype=dtype, device=device)
    classes = req.classes
    template = req.template
    if classes is None:
        if backbone.source != DEMO_SOURCE:
            raise BadInputError("no classes given: pass --classes a,b,c or --data DIR (one sub-folder per class)")
        classes, template = list(DIGIT_NAMES), template or DEMO_TEMPLATE
    template = template or DEFAULT_TEMPLATE
    spec = ClassSpec(classes, make_prompts(classes, template), template=template)
    return Classifier(TorchBackend(backbone), spec, req.max_batch)
