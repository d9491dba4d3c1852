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

from noop_rt.runtime.classifier import Classifier, ClassScore, Result
from noop_rt.runtime.errors import NoopError
from noop_rt.runtime.opener import LoadOptions, open_classifier

__all__ = ["ClassScore", "Classifier", "LoadOptions", "NoopError", "Result", "load"]


def load(source: str | Path | LoadOptions | None = None, **options: Any) -> Classifier:
    """Open a classifier.

    source: a bundle folder (`export/pets`, any backend but torch), a NoOp checkpoint (`pets.pt`, torch backend), a
    diffusers Stable Diffusion folder (zero-shot strategies, torch backend, give `classes`), "demo" or None for the
    built-in demo; or a ready `LoadOptions` (then `options` override its fields).
    options (keywords; an unknown one is a TypeError naming the closest):
      classes: class names (a list or "a,b,c"); template: the prompt template for them ("a photo of a {}");
      prompts: {class: prompt} or a CSV file of class, prompt (Li et al.'s prompt files work);
      backend: auto | tensorrt | onnxruntime | openvino | torch; device: auto | cpu | cuda[:N];
      method: noop | baseline | adaptive | pruned (default: noop when the model has a learned noise);
      kind: "bundle" | "checkpoint" | "diffusers" to insist on what `source` is (default: detected);
      fp16 (torch), max_batch, threads, engines (TensorRT folder);
      lora: a LoRA .safetensors (diffusers or kohya keys) fused into a diffusers folder's UNet/text encoder, or the
      new place of the one a checkpoint was trained with; lora_scale: its strength (default 1, or the checkpoint's);
      strategy options: loss, pairs, stages, seed, alpha, round_size, max_pairs, robust (a RobustConfig; torch).
    `Classifier.classify` then takes paths, PIL images, (H, W, 3) uint8 arrays or preprocessed (3, R, R) floats.
    """
    request = source.updated(**options) if isinstance(source, LoadOptions) else LoadOptions.of(source, **options)
    return open_classifier(request)
