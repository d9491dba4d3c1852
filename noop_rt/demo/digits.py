"""The demo's data: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, offline), upsampled to 16x16.

Fixed split (documented in the model card):
- `test`: 360 held-out images (20 %, stratified, seed 0) — never seen by the backbone or by NoOp training.
- `train`: the other 1437 images train the backbone.
- `fewshot`: `shots` images per class from `train` (seed 1), and `val`: the next `val_shots` per class, for NoOp
  (`noop-rt demo-data DIR` writes them as DIR/train, DIR/val and DIR/test image folders).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from noop_rt.demo import DIGIT_NAMES, SHOTS, VAL_SHOTS

if TYPE_CHECKING:
    import torch

RESOLUTION = 16
TEST_SIZE = 360


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, 16, 16) grey images (ink bright, background 0) and int labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    images = np.stack([
        np.asarray(Image.fromarray(scan, mode="L").resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR))
        for scan in scans
    ])
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of the fixed `train` / `test` split (stratified, seed 0)."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=0
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def fewshot_indices(labels: np.ndarray, train: np.ndarray, shots: int, val_shots: int) -> dict[str, np.ndarray]:
    """`shots` + `val_shots` images per class drawn from `train` (seed 1): NoOp's few-shot and validation sets."""
    rng = np.random.default_rng(1)
    fewshot: list[int] = []
    val: list[int] = []
    for cls in range(len(DIGIT_NAMES)):
        members = rng.permutation(train[labels[train] == cls])
        fewshot += members[:shots].tolist()
        val += members[shots:shots + val_shots].tolist()
    return {"fewshot": np.array(sorted(fewshot)), "val": np.array(sorted(val))}


def write_image_folders(out: Path, shots: int = SHOTS, val_shots: int = VAL_SHOTS) -> dict[str, int]:
    """Write `out/{train,val,test}/<class>/<index>.png` image-folder trees (train = the few-shot set, `shots` per
    class; val = `val_shots` per class; test = the 360 held-out digits); returns the image count per split."""
    images, labels = digit_images()
    splits = split_indices(labels)
    splits.update(fewshot_indices(labels, splits["train"], shots, val_shots))
    counts = {}
    for name, key in (("train", "fewshot"), ("val", "val"), ("test", "test")):
        for idx in splits[key]:
            folder = out / name / DIGIT_NAMES[labels[idx]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[idx], mode="L").save(folder / f"{idx:04d}.png")
        counts[name] = len(splits[key])
    return counts


def split_tensors(name: str, shots: int = SHOTS, val_shots: int = VAL_SHOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 16, 16) in [-1, 1] (exactly what loading the written PNGs gives) and labels (N,) of a split:
    'train', 'test', 'fewshot' or 'val'. Needs torch (the train extra)."""
    import torch

    images, labels = digit_images()
    splits = split_indices(labels)
    if name in ("fewshot", "val"):
        splits.update(fewshot_indices(labels, splits["train"], shots, val_shots))
    idx = splits[name]
    x = torch.from_numpy(images[idx]).float().div(127.5).sub(1.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels[idx])


def write_examples(folder: Path) -> list[Path]:
    """One held-out test image per class, named after the class (`seven.png`)."""
    images, labels = digit_images()
    test = split_indices(labels)["test"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cls, name in enumerate(DIGIT_NAMES):
        idx = test[labels[test] == cls][0]
        path = folder / f"{name}.png"
        Image.fromarray(images[idx], mode="L").save(path)
        written.append(path)
    return written
