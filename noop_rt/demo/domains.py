"""Shifted digit domains for the demo, generated in code (no downloads): where NoOp's learned noise no longer fits.

The demo's backbone and its NoOp checkpoint know one digit domain: scikit-learn's 8x8 handwritten scans, bilinear
upsampled to 16x16, bright ink on black (`digits.py`). Each domain below draws the same ten classes differently:

- `printed`: digits typeset, not handwritten. Pillow's built-in fonts only (so every machine renders the same
  pixels): the scalable default face (`ImageFont.load_default(size)`, Aileron Regular, needs FreeType) for 80 % of
  the images and the fixed bitmap default font (scaled up, blocky) for the rest; rendered white on black on a
  64x64 canvas at a random size (glyph height 34-56 px), stroke width 0-3 px, rotation +-12 degrees, aspect
  0.8-1.25, centred on its ink then shifted +-4 px, and area-averaged down to 16x16.
- `thick_affine`: the scikit-learn digits with strong stroke and geometry changes: upsampled to 64x64, strokes
  thickened by a grey max filter (5 or 7 px at 64 px, i.e. 1.25-1.75 px at 16), a random affine map (rotation 20-35
  degrees either way, shear +-0.35, scale 0.65-0.85, shift +-6 px) and back to 16x16.
- `inverted_texture`: the scikit-learn digits as dark ink on a bright, textured background: inverted, then a smooth
  random texture (4x4 Gaussian noise, bicubic-upsampled, clipped to +-1 sd, grey 190 +- 50) where there is no
  ink.

Splits (the class folders are the demo's class names, `zero` ... `nine`, so `noop-rt train --model demo --data DIR`
works on `write_domain`'s output):
- scikit-learn based domains: `test` = the demo's 360 held-out digits (never seen by the backbone or by NoOp's
  training in any form), transformed; `train` (a pool of `TRAIN_POOL` per class for k-shot training) and `val`
  (`VAL_PER_CLASS` per class) = disjoint draws from the backbone's training split (seed 2), transformed: the
  backbone saw those scans, never in this domain.
- `printed`: every image is a fresh rendering; `train`, `val` and `test` use disjoint random streams, `test` has 36
  per class (360, as the held-out digits).

Every image's random parameters come from `numpy.random.default_rng((DOMAIN_SEED[domain], split, index))`, so a
split is the same whatever else is generated and in whatever order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from noop_rt.demo import DIGIT_NAMES

RESOLUTION = 16
CANVAS = 64  # render / transform at 4x, then area-average down to 16x16
TRAIN_POOL = 32  # training images per class written for k-shot training (k <= TRAIN_POOL)
VAL_PER_CLASS = 30  # validation images per class (= noop-rt train's default --val-shots)
PRINTED_TEST_PER_CLASS = 36
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
DOMAIN_SEED = {"printed": 101, "thick_affine": 102, "inverted_texture": 103}


@dataclass(frozen=True)
class Domain:
    name: str
    summary: str  # one line for tables
    render: Callable[[np.random.Generator, int, np.ndarray | None], np.ndarray]  # (rng, label, source) -> uint8 16x16
    from_scans: bool  # True: transforms the scikit-learn digits; False: draws from nothing


def _downsample(canvas: Image.Image) -> np.ndarray:
    return np.asarray(canvas.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), dtype=np.uint8)


def _upsample(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, mode="L").resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)


def _ink_centred(glyph: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Paste the glyph's inked box at the canvas centre, shifted by up to 4 px."""
    box = glyph.getbbox()
    if box is None:
        return Image.new("L", (CANVAS, CANVAS))
    ink = glyph.crop(box)
    canvas = Image.new("L", (CANVAS, CANVAS))
    dx, dy = (int(v) for v in rng.integers(-4, 5, size=2))
    canvas.paste(ink, ((CANVAS - ink.width) // 2 + dx, (CANVAS - ink.height) // 2 + dy))
    return canvas


def render_printed(rng: np.random.Generator, label: int, source: np.ndarray | None = None) -> np.ndarray:
    """A typeset digit (see the module doc), uint8 (16, 16), ink bright."""
    text = str(label)
    big = Image.new("L", (3 * CANVAS, 3 * CANVAS))
    draw = ImageDraw.Draw(big)
    stroke = int(rng.integers(0, 4))
    if rng.random() < 0.8:
        font = ImageFont.load_default(size=int(rng.integers(44, 72)))
        draw.text((CANVAS, CANVAS // 2), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        glyph = big
    else:  # the bitmap font (about 6x11 px glyphs), drawn small and scaled up: a blocky typeface
        small = Image.new("L", (32, 32))
        ImageDraw.Draw(small).text((8, 8), text, fill=255, font=ImageFont.load_default_imagefont())
        box = small.getbbox() or (0, 0, 32, 32)
        small = small.crop(box)
        height = int(rng.integers(34, 57))
        glyph = small.resize((max(1, round(small.width * height / small.height)), height),
                             Image.Resampling.BILINEAR)
        if stroke:
            glyph = glyph.filter(ImageFilter.MaxFilter(2 * stroke + 1))
    box = glyph.getbbox() or (0, 0, glyph.width, glyph.height)
    glyph = glyph.crop(box)
    height = int(rng.integers(34, 57))
    aspect = float(rng.uniform(0.8, 1.25))
    width = max(1, round(glyph.width * height / glyph.height * aspect))
    glyph = glyph.resize((width, height), Image.Resampling.BILINEAR)
    glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=True)
    return _downsample(_ink_centred(glyph, rng))


def render_thick_affine(rng: np.random.Generator, label: int, source: np.ndarray | None) -> np.ndarray:
    """A scikit-learn digit with thick strokes and a strong random affine map, uint8 (16, 16), ink bright."""
    assert source is not None
    img = _upsample(source).filter(ImageFilter.MaxFilter(int(rng.choice([5, 7]))))
    angle = np.deg2rad(rng.uniform(20, 35) * rng.choice([-1, 1]))
    shear = rng.uniform(-0.35, 0.35)
    scale = rng.uniform(0.65, 0.85)
    shift = rng.uniform(-6, 6, size=2)
    cos, sin = np.cos(angle), np.sin(angle)
    forward = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)  # PIL maps output pixels to input pixels
    centre = np.array([CANVAS / 2, CANVAS / 2])
    offset = centre - inverse @ (centre + shift)
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    img = img.transform((CANVAS, CANVAS), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return _downsample(img)


def render_inverted_texture(rng: np.random.Generator, label: int, source: np.ndarray | None) -> np.ndarray:
    """A scikit-learn digit as dark ink on a bright textured background, uint8 (16, 16)."""
    assert source is not None
    ink = source.astype(np.float64) / 255.0
    texture = rng.standard_normal((4, 4))
    texture = np.asarray(Image.fromarray(texture.astype(np.float32), mode="F").resize(
        (RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC), dtype=np.float64)
    background = 190.0 + 50.0 * np.clip(texture, -1.0, 1.0)  # grey 140..240
    out = background * (1.0 - ink)  # ink (1) -> black, no ink (0) -> the texture
    return np.clip(out, 0, 255).round().astype(np.uint8)


DOMAINS: dict[str, Domain] = {
    "printed": Domain("printed", "typeset digits, Pillow's built-in fonts", render_printed, from_scans=False),
    "thick_affine": Domain("thick_affine", "held-out scans, thick strokes + strong affine", render_thick_affine,
                           from_scans=True),
    "inverted_texture": Domain("inverted_texture", "held-out scans, dark ink on a textured bright background",
                               render_inverted_texture, from_scans=True),
}


def _scan_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices into `digit_images()` of a scan-based domain's split (see the module doc)."""
    from noop_rt.demo.digits import split_indices

    splits = split_indices(labels)
    if split == "test":
        return splits["test"]
    rng = np.random.default_rng(2)
    train_split = splits["train"]
    chosen: list[int] = []
    for cls in range(len(DIGIT_NAMES)):
        members = rng.permutation(train_split[labels[train_split] == cls])
        part = members[:TRAIN_POOL] if split == "train" else members[TRAIN_POOL:TRAIN_POOL + VAL_PER_CLASS]
        chosen += part.tolist()
    return np.array(sorted(chosen))


def domain_images(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A domain's split: uint8 (N, 16, 16) grey images and int64 labels (N,)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    domain = DOMAINS[name]
    seed = (DOMAIN_SEED[name], _SPLIT_CODE[split])
    if domain.from_scans:
        from noop_rt.demo.digits import digit_images

        scans, labels = digit_images()
        idx = _scan_indices(labels, split)
        images = [domain.render(np.random.default_rng((*seed, int(i))), int(labels[i]), scans[i]) for i in idx]
        return np.stack(images), labels[idx].astype(np.int64)
    per_class = {"train": TRAIN_POOL, "val": VAL_PER_CLASS, "test": PRINTED_TEST_PER_CLASS}[split]
    labels = np.repeat(np.arange(len(DIGIT_NAMES)), per_class)
    images = [domain.render(np.random.default_rng((*seed, i)), int(y), None) for i, y in enumerate(labels)]
    return np.stack(images), labels.astype(np.int64)


def domain_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, 3, 16, 16) float32 in [-1, 1] (exactly what loading the written PNGs gives) and labels."""
    images, labels = domain_images(name, split)
    x = images.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1)), labels


def write_domain(name: str, out: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    """Write `out/<split>/<class>/<index>.png` image-folder trees; returns the image count per split."""
    out = Path(out)
    counts = {}
    for split in splits:
        images, labels = domain_images(name, split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = out / split / DIGIT_NAMES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
        counts[split] = len(labels)
    return counts


def contact_sheet(name: str, split: str = "test", per_class: int = 8, zoom: int = 4) -> Image.Image:
    """The first `per_class` images of each class side by side (a row per class), `zoom`x, for documentation."""
    images, labels = domain_images(name, split)
    rows = []
    for cls in range(len(DIGIT_NAMES)):
        picks = images[labels == cls][:per_class]
        rows.append(np.concatenate(list(picks), axis=1))
    sheet = Image.fromarray(np.concatenate(rows, axis=0), mode="L")
    return sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.Resampling.NEAREST)
