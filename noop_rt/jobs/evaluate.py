"""`noop-rt eval`: accuracy, per-class accuracy and confusion matrix of a classifier on a labelled image folder,
with the whole protocol recorded (method and settings, timesteps, noise, loss, prompts, preprocessing, image
count, model fingerprint) so the number can be reproduced. No torch."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from noop_rt import __version__
from noop_rt.jobs.parallel import EnginePlan, ordered
from noop_rt.runtime import strategies
from noop_rt.runtime.classes import ImageFolder, describe_unknown
from noop_rt.runtime.errors import BadInputError


def protocol(classifier: Any, images: int) -> dict[str, Any]:
    """What fixes the result of running `classifier` with its current settings on `images` images."""
    info = classifier.model.info
    config = classifier.config()
    return {"strategy": strategies.protocol(classifier.method, config, info.num_train_timesteps, info.t_star),
            "loss": getattr(config, "loss", None), "classes": classifier.classes,
            "prompts": classifier.class_set.prompts, "zero_shot_classes": classifier.class_set.zero_shot,
            "tau": info.tau if classifier.calibrated(classifier.method, config) else "uncalibrated (1/std per image)",
            "preprocessing": info.preprocessing, "images": images,
            "model": {"name": info.name, "source": info.source, "location": info.location,
                      "fingerprint": info.fingerprint, "precision": info.precision,
                      "prediction_type": info.prediction_type},
            "backend": classifier.backend, "device": classifier.device, "noop_rt": __version__}


def evaluate_folder(classifier: Any, dataset: ImageFolder, show_progress: bool = True, *,
                    classifiers: list[Any] | None = None, engine: EnginePlan | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of `classifier` on `dataset` (classes matched by name).

    `engine`: calls in flight (jobs/parallel.py), through `classifiers` (one per call when the engine's sessions are
    not shared; default: `classifier` alone); recorded in the report. Default: one call at a time."""
    index = {name: i for i, name in enumerate(classifier.classes)}
    missing = [name for name in dataset.classes if name not in index]
    if missing:
        raise BadInputError(f"data classes not known to the classifier: {describe_unknown(missing, classifier.classes)}"
                            " (classifier classes: "
                            f"{', '.join(classifier.classes[:10])}{' ...' if len(classifier.classes) > 10 else ''})")
    c = len(classifier.classes)
    confusion = np.zeros((c, c), dtype=np.int64)
    evals = escalated = 0
    start = time.perf_counter()
    bar = tqdm(total=len(dataset), desc=f"eval {classifier.method}", unit="img", disable=not show_progress,
               file=sys.stderr)
    engine = engine or EnginePlan(1, None, 1, "one call at a time")
    pool = classifiers or [classifier]
    step = 16
    chunks = [dataset.samples[s:s + step] for s in range(0, len(dataset), step)]

    def infer(slot: int, chunk: list[tuple[Any, int]]) -> list[Any]:  # decodes too: overlaps the other calls
        return pool[slot % len(pool)].classify([str(p) for p, _ in chunk], top_k=1)

    results = ordered(chunks, lambda chunk: chunk, infer, engine.concurrency)
    try:
        for chunk, answers in zip(chunks, results, strict=True):
            for (_, label), result in zip(chunk, answers, strict=True):
                confusion[index[dataset.classes[label]], index[result.label]] += 1
                evals += result.unet_evals
                escalated += bool(result.escalated)
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{np.trace(confusion) / confusion.sum():.3f}")
    finally:
        results.close()
        bar.close()
    seen = confusion.sum(axis=1)
    per_class = {name: float(confusion[i, i] / seen[i]) for i, name in enumerate(classifier.classes) if seen[i] > 0}
    return {"accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)), "n": len(dataset),
            "per_class": per_class, "confusion": confusion.tolist(), "classes": classifier.classes,
            "method": classifier.method, "backend": classifier.backend,
            "unet_evals_per_image": evals / max(len(dataset), 1),
            **({"escalated_share": escalated / max(len(dataset), 1)} if classifier.method == "cascade" else {}),
            "seconds": time.perf_counter() - start,
            "drift": classifier.drift.report() if classifier.drift is not None and classifier.drift.seen else None,
            "engine": engine.to_json(), "protocol": protocol(classifier, len(dataset))}
