"""Image decoding and preprocessing, image folders, prompts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from noop_rt.data import ImageFolder, load_image, make_prompts, open_rgb, parse_class_list, to_model_input
from noop_rt.errors import BadInputError


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16", "RGB"])
def test_every_mode_becomes_rgb_in_range(tmp_path, mode: str) -> None:
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    base = Image.new("RGB", (30, 20), (200, 100, 50))
    img = base.convert(mode) if mode != "I;16" else Image.new("I;16", (30, 20), 40000)
    img.save(path)
    arr = load_image(path, 16)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.float32
    assert arr.min() >= -1.0 and arr.max() <= 1.0


def test_alpha_is_composited_on_white(tmp_path) -> None:
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.allclose(load_image(tmp_path / "clear.png", 8), 1.0)


def test_exif_orientation_is_applied(tmp_path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    shown = open_rgb(tmp_path / "rot.jpg")
    assert shown.size == (20, 40)  # portrait after applying the orientation
    arr = np.asarray(shown, dtype=np.float32).mean(axis=2)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is now on top


def test_resize_shorter_side_then_centre_crop() -> None:
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 30))  # white centre stripe
    arr = to_model_input(img, 10)
    assert arr.shape == (3, 10, 10)
    assert arr[:, :, 5].mean() > 0.9 and arr[:, :, 0].mean() < -0.5


def test_missing_and_corrupt_images_are_clear_errors(tmp_path) -> None:
    with pytest.raises(BadInputError, match="image not found"):
        load_image(tmp_path / "nope.png", 8)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadInputError, match="cannot read image"):
        load_image(tmp_path / "bad.png", 8)
    Image.new("RGB", (64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="cannot read image"):
        load_image(tmp_path / "cut.png", 8)


def test_image_folder_names_classes_from_folders(shape_images) -> None:
    ds = ImageFolder.scan(shape_images)
    assert ds.classes == ["blue circle", "red square"]
    assert len(ds) == 6 and {label for _, label in ds.samples} == {0, 1}
    picked, rest = ds.per_class(2, seed=0)
    assert len(picked) == 4 and len(rest) == 2 and not {p for p, _ in picked} & {p for p, _ in rest}


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(BadInputError, match="not found"):
        ImageFolder.scan(tmp_path / "missing")
    with pytest.raises(BadInputError, match="no class sub-folders"):
        ImageFolder.scan(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(BadInputError, match="no images"):
        ImageFolder.scan(tmp_path)


def test_prompts_and_class_lists() -> None:
    assert make_prompts(["cat", "great pyrenees"]) == ["a photo of a cat", "a photo of a great pyrenees"]
    assert make_prompts(["x"], "{}, a type of pet") == ["x, a type of pet"]
    with pytest.raises(BadInputError, match="exactly one"):
        make_prompts(["x"], "no slot")
    assert parse_class_list(" a, b ,c,") == ["a", "b", "c"]
    with pytest.raises(BadInputError, match="empty"):
        parse_class_list(" , ")
    with pytest.raises(BadInputError, match="duplicate"):
        parse_class_list("a,b,a")
