"""The Python API: `noop_rt.load(...)` -> a `Classifier`. The CLI, `batch`, `bench` and the server are built on it.

    import noop_rt
    clf = noop_rt.load()                                  # the built-in demo (handwritten digits)
    result = clf.classify("noop_rt/demo/examples/seven.png")
    print(result.label, result.top[0].prob, result.timings)

Sources: a bundle folder (`export/pets`), a checkpoint (`pets.pt`, torch backend), a diffusers Stable Diffusion
folder with `classes=[...]` (zero-shot strategies, torch backend), or nothing for the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noop_rt.runtime.classifier import Classifier, ClassScore, Result, Timings
from noop_rt.runtime.opener import LoadOptions, open_classifier

__all__ = ["ClassScore", "Classifier", "LoadOptions", "Result", "Timings", "load"]


def load(source: str | Path | None = None, *, classes: list[str] | str | None = None, template: str | None = None,
         prompts: dict[str, str] | str | Path | None = None, backend: str = "auto", device: str = "auto",
         method: str | None = None, fp16: bool = False, max_batch: int | None = None, threads: int | None = None,
         engines: str | Path | None = None, kind: str | None = None, lora: str | Path | None = None,
         lora_scale: float | None = None, **strategy: Any) -> Classifier:
    """Open a classifier.

    classes: class names (a list or "a,b,c"); template: the prompt template for them ("a photo of a {}");
    prompts: {class: prompt} or a CSV file of class, prompt (Li et al.'s prompt files work);
    backend: auto | tensorrt | onnxruntime | openvino | torch; device: auto | cpu | cuda[:N];
    method: noop | baseline | adaptive | pruned (default: noop when the model has a learned noise);
    kind: "bundle" | "checkpoint" | "diffusers" to insist on what `source` is (default: detected);
    lora: a LoRA .safetensors (diffusers or kohya keys) fused into a diffusers folder's UNet/text encoder, or the
    new place of the one a checkpoint was trained with; lora_scale: its strength (default 1, or the checkpoint's);
    strategy options: loss, pairs, stages, seed, alpha, round_size, robust (a RobustConfig; torch backend).
    """
    from noop_rt.runtime.classes import parse_class_list, read_prompts_file

    if isinstance(classes, str):
        classes = parse_class_list(classes)
    if isinstance(prompts, (str, Path)):
        prompts = read_prompts_file(prompts)
    options = LoadOptions(kind=kind, backend=backend, device=device, fp16=fp16, max_batch=max_batch, threads=threads,
                          engines=Path(engines) if engines is not None else None,
                          classes=list(classes) if classes is not None else None, template=template, prompts=prompts,
                          method=method, strategy=strategy, lora=Path(lora) if lora is not None else None,
                          lora_scale=lora_scale)
    return open_classifier(source, options)
