"""Decoding in bounded memory (runtime.images.decode_model_input, the one decoder of the CLI, batch and the server):
small images take the exact published path, large ones are reduced early within a stated tolerance, a large JPEG
is decoded at a reduced scale (its decode peak measured in a child process), and Pillow's bomb warning never
reaches the caller."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noop_rt.demo import EXAMPLES_DIR
from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.images import decode_model_input, decode_rgb, to_model_input

RNG = np.random.default_rng(0)


def textured(width: int, height: int, mode: str) -> Image.Image:
    """A smooth random texture (a photograph's worth of detail at every scale down to ~40 px)."""
    bands = len(mode)
    small = RNG.integers(0, 256, (height // 40 + 2, width // 40 + 2, bands), dtype=np.uint8)
    return Image.fromarray(small if bands > 1 else small[..., 0], mode=mode).resize((width, height),
                                                                                     Image.Resampling.BICUBIC)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def full_size(data: bytes, resolution: int) -> np.ndarray:
    """The published preprocessing, on the full-size image."""
    return to_model_input(decode_rgb(data, "x"), resolution)


@pytest.mark.parametrize(("size", "mode", "fmt", "resolution"), [
    ((16, 16), "RGB", "PNG", 16), ((150, 100), "RGBA", "PNG", 16), ((191, 191), "L", "JPEG", 16),
    ((640, 480), "RGB", "JPEG", 64), ((1024, 768), "RGB", "JPEG", 512)])
def test_images_under_twelve_times_the_model_input_take_the_exact_path(size: tuple[int, int], mode: str, fmt: str,
                                                                        resolution: int) -> None:
    data = encoded(textured(*size, mode), fmt)
    np.testing.assert_array_equal(decode_model_input(data, "x", resolution), full_size(data, resolution))


def test_the_demo_examples_take_the_exact_path() -> None:
    for path in sorted(EXAMPLES_DIR.glob("*.png")):
        data = path.read_bytes()
        np.testing.assert_array_equal(decode_model_input(data, path, 16), full_size(data, 16))


@pytest.mark.parametrize(("size", "mode", "fmt"), [((3000, 2000), "RGB", "PNG"), ((2000, 2400), "RGBA", "PNG"),
                                                   ((4000, 3000), "RGB", "JPEG"), ((2000, 2000), "L", "JPEG")])
def test_large_images_are_reduced_early_within_tolerance(size: tuple[int, int], mode: str, fmt: str) -> None:
    """Against the full-size path, in grey levels (of 255): a mean under 0.5 and no value off by more than 8."""
    data = encoded(textured(*size, mode), fmt)
    reduced, exact = decode_model_input(data, "x", 16), full_size(data, 16)
    difference = np.abs(reduced - exact) * 127.5
    assert difference.mean() < 0.5 and difference.max() <= 8.0, (difference.mean(), difference.max())


def test_exif_rotation_is_kept_when_reducing() -> None:
    img = textured(3000, 1000, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=92, exif=exif)
    data = buffer.getvalue()
    difference = np.abs(decode_model_input(data, "x", 16) - full_size(data, 16)) * 127.5
    assert difference.mean() < 0.5, difference.mean()


PEAK = r"""
import json, sys
from pathlib import Path
from noop_rt.runtime.images import decode_model_input, decode_rgb, to_model_input

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

data = Path(sys.argv[1]).read_bytes()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
before = kib("VmRSS:")
if sys.argv[2] == "bounded":
    decode_model_input(data, "x", 16)
else:
    to_model_input(decode_rgb(data, "x"), 16)
print(json.dumps((kib("VmHWM:") - before) / 1024))
"""


def decode_peak_mb(path: Path, how: str) -> float:
    """How far a fresh process's peak RSS rises while it decodes `path` (MB)."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), how], capture_output=True, text=True, timeout=120,
                         check=True)
    return float(json.loads(out.stdout))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path: Path) -> None:
    """A 6000 x 4000 JPEG is 72 MB of RGB at full size; for a 16-px model it is decoded at 1/8 scale."""
    path = tmp_path / "large.jpg"
    path.write_bytes(encoded(textured(6000, 4000, "RGB"), "JPEG"))
    full, bounded = decode_peak_mb(path, "full"), decode_peak_mb(path, "bounded")
    assert full > 60, full  # the measurement sees the full-size decode ...
    assert bounded < 20, (bounded, full)  # ... and the reduced one stays far below it (measured: 277 -> 6 MB)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_a_large_png_is_reduced_before_its_full_size_conversions(tmp_path: Path) -> None:
    """A 3000 x 3000 RGBA PNG (36 MB decoded): compositing on white at full size takes several copies; reduced
    first, it takes about two (measured: 208 -> 105 MB)."""
    path = tmp_path / "large.png"
    path.write_bytes(encoded(textured(3000, 3000, "RGBA"), "PNG"))
    full, bounded = decode_peak_mb(path, "full"), decode_peak_mb(path, "bounded")
    assert bounded < 0.7 * full, (bounded, full)


def test_pillows_bomb_warning_never_reaches_the_caller() -> None:
    """Over Pillow's own limit, its DecompressionBombWarning would be raised as an error here; the caller gets
    noop-rt's one line instead."""
    data = encoded(Image.new("1", (10_000, 9_000)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadInputError, match="over the 89 M pixel limit"):
            decode_model_input(data, "big.png", 16)
