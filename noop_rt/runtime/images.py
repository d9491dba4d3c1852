"""Images in, arrays out: decoding (any PIL mode, EXIF orientation), resize + centre crop, [-1, 1]."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from noop_rt.runtime.errors import BadInputError

MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning limit
REDUCE_FROM = 12.0  # images at least this many times their resized size are reduced early (decode_model_input) ...
REDUCING_GAP = 6.0  # ... to no less than this many times it (a mean 0.1-0.3 grey level from the full-size path)
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA")  # reduced before the conversion to RGB (the alpha ones premultiplied)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes: a local path, or any URI pyarrow's filesystems read (s3://, gs://, hdfs://, file://)."""
    if is_uri(path):
        import pyarrow.fs

        try:
            fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
            with fs.open_input_stream(inner) as fh:
                return fh.read()
        except (OSError, ValueError, pyarrow.ArrowException) as exc:
            raise BadInputError(f"cannot read image {path}: {str(exc).splitlines()[0]}") from None
    p = Path(path)
    if p.is_dir():
        raise BadInputError(f"{p} is a folder, not an image: pass its images (e.g. {p}/*.png) or run "
                            f"noop-rt batch {p} --out labels.jsonl")
    if not p.is_file():
        raise BadInputError(f"image not found: {p}")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read image {p}: {exc.strerror or exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: palette/grey/16-bit/CMYK converted, alpha composited on white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / peak * 255).round().astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, name: str | Path, notes: list[str] | None = None) -> Image.Image:
    """Decode image bytes to RGB (EXIF orientation applied). An image over MAX_PIXELS is refused from its header,
    before its pixels are allocated (Pillow's own bomb warning is not shown: this limit is the one that holds). An
    animated image's first frame is decoded, and `notes` (when given) says so."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise BadInputError(f"cannot read image {name}: {img.width}x{img.height} pixels is over the "
                                    f"{MAX_PIXELS // 1_000_000} M pixel limit")
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1 and notes is not None:
                notes.append(f"an animated image of {frames} frames: the first is classified")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image format Pillow can decode (corrupt or truncated?)"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot read image {name}: {reason}") from None


def decode_model_input(data: bytes, name: str | Path, resolution: int, notes: list[str] | None = None) \
        -> np.ndarray:
    """Image file bytes -> the model's input (3, R, R) float32 in [-1, 1], decoding no more than the model needs:
    `decode_rgb` then `to_model_input`, except that an image over REDUCE_FROM times its resized size is first
    brought down to at least REDUCING_GAP times that size, before any full-size conversion: a JPEG decoded at a
    reduced scale (Pillow's `draft`, DCT scaling), other formats reduced by an integer factor (Pillow's `reduce`,
    a box average) right after decoding. The final bicubic resize and the crop keep the full image's arithmetic
    (Pillow's own `reducing_gap` scheme): the result differs from the full-size path by a mean 0.1-0.3 grey level
    (tests/test_decode_bounded.py); smaller images, the demo's among them, take the full-size path unchanged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            with img:
                return _decode_reduced(img, name, resolution, notes)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInputError(f"cannot read image {name}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow can decode (corrupt or truncated?)"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _decode_reduced(img: Image.Image, name: str | Path, resolution: int, notes: list[str] | None) -> np.ndarray:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise BadInputError(f"cannot read image {name}: {width}x{height} pixels is over the "
                            f"{MAX_PIXELS // 1_000_000} M pixel limit")
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1 and notes is not None:
        notes.append(f"an animated image of {frames} frames: the first is classified")
    new_w, new_h = resized_size(width, height, resolution)
    content = (float(width), float(height))  # the image's extent in the (reduced) pixels at hand
    large = min(width / new_w, height / new_h) >= REDUCE_FROM
    if large and img.format == "JPEG":
        drafted = img.draft(img.mode, (math.ceil(new_w * REDUCING_GAP), math.ceil(new_h * REDUCING_GAP)))
        if drafted is not None:
            content = (float(drafted[1][2]), float(drafted[1][3]))
    img.load()
    before = img.size
    img = ImageOps.exif_transpose(img)
    if img.size != before:  # turned a quarter: so are the sizes
        width, height, new_w, new_h, content = height, width, new_h, new_w, (content[1], content[0])
    factor = int(min(content[0] / new_w, content[1] / new_h) / REDUCING_GAP)
    if large and factor >= 2 and img.mode in REDUCIBLE_MODES:
        img = img.reduce(factor)
        content = (content[0] / factor, content[1] / factor)
    return to_model_input(to_rgb(img), resolution, source=(width, height), box=(0.0, 0.0, *content))


def open_rgb(path: str | Path, notes: list[str] | None = None) -> Image.Image:
    """Read and decode one image (local path or URI) to RGB."""
    return decode_rgb(read_bytes(path), path, notes)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """torchvision `Resize(resolution)` arithmetic (what Li et al.'s code uses): the shorter side becomes
    `resolution`, the longer `int(resolution * long / short)` (truncated: 500x375 -> 682x512, not 683)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def crop_offsets(width: int, height: int, resolution: int) -> tuple[int, int]:
    """torchvision `CenterCrop(resolution)` arithmetic: (left, top) = round((side - resolution) / 2), Python's
    round (half to even)."""
    return round((width - resolution) / 2.0), round((height - resolution) / 2.0)


def to_model_input(img: Image.Image, resolution: int, source: tuple[int, int] | None = None,
                   box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize the shorter side to `resolution` (bicubic), centre-crop square, scale to [-1, 1]: (3, R, R) float32.
    The sizes and offsets follow torchvision's Resize + CenterCrop, so scores reproduce the reference code.
    `source` and `box`: `img` is a reduced copy of an image of size `source`, whose content covers `box` of it (the
    sizes still follow `source`)."""
    w, h = source or img.size
    new_w, new_h = resized_size(w, h, resolution)
    if box is not None and source is not None and source != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, box=box)
    elif (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = crop_offsets(new_w, new_h, resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def as_model_input(image: object, resolution: int, notes: list[str] | None = None) -> np.ndarray:
    """A path, PIL image, image file bytes or numpy array -> (3, R, R) float32 in [-1, 1]. Arrays: (H, W, 3) or
    (H, W) uint8 images are preprocessed like files; a (3, R, R) float array is taken as already preprocessed.
    `notes` (when given) gets a line for what the label should be read with: an animated image, a blank one."""
    array = _model_input(image, resolution, notes)
    if notes is not None and array.size and float(array.max() - array.min()) < 1e-6:
        notes.append("a blank image (one colour): unlike any training image, its label says little")
    return array


def _model_input(image: object, resolution: int, notes: list[str] | None) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_image(image, resolution, notes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_model_input(bytes(image), "<bytes>", resolution, notes)
    if isinstance(image, Image.Image):
        return to_model_input(to_rgb(image), resolution)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim in (2, 3) and (image.ndim == 2 or image.shape[2] in (1, 3, 4)):
            return to_model_input(to_rgb(Image.fromarray(image.squeeze(-1) if image.ndim == 3 and
                                                          image.shape[2] == 1 else image)), resolution)
        if image.ndim == 3 and image.shape == (3, resolution, resolution) and np.issubdtype(image.dtype, np.floating):
            return preprocessed_batch(image[None], resolution, unit_range=True)[0]
        raise BadInputError(f"cannot classify an array of shape {image.shape} and dtype {image.dtype}: pass an "
                            f"(H, W, 3) uint8 image or a preprocessed (3, {resolution}, {resolution}) float array")
    raise BadInputError(f"cannot classify a {type(image).__name__}: pass a path, a PIL image or a numpy array")


def preprocessed_batch(images: np.ndarray, resolution: int, *, unit_range: bool = False) -> np.ndarray:
    """A preprocessed batch (B, 3, R, R), checked: float, finite, within [-1, 1]. `unit_range`: also refuse an image
    whose values vary within [0, 1] only, the mark of an array scaled to [0, 1] (classified wrong without a word);
    a plain white image (all 1) passes."""
    if images.ndim != 4 or images.shape[1:] != (3, resolution, resolution) or not np.issubdtype(images.dtype,
                                                                                              np.floating):
        raise BadInputError(f"a preprocessed batch must be float (B, 3, {resolution}, {resolution}) in [-1, 1]; got "
                            f"{images.dtype} {tuple(images.shape)} (pass uint8 (H, W, 3) images one by one to have "
                            "them preprocessed)")
    if not np.isfinite(images).all() or images.min() < -1.001 or images.max() > 1.001:
        raise BadInputError("a preprocessed float image must hold finite values in [-1, 1]")
    if unit_range and images.size and images.min() >= 0.0 and images.max() > images.min():
        raise BadInputError("a preprocessed float image holds values in [0, 1] only: the model takes [-1, 1] "
                            "(x * 2 - 1), or pass the uint8 (H, W, 3) image")
    return np.ascontiguousarray(images, dtype=np.float32)


def load_image(path: str | Path, resolution: int, notes: list[str] | None = None) -> np.ndarray:
    """`decode_model_input` of the file's bytes (local path or URI): (3, R, R) float32 in [-1, 1]."""
    return decode_model_input(read_bytes(path), path, resolution, notes)


