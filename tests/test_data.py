"""Image decoding and preprocessing, image folders, prompts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from noop_rt.runtime.classes import ImageFolder, make_prompts, parse_class_list, read_prompts_file
from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.images import as_model_input, crop_offsets, load_image, open_rgb, resized_size, to_model_input


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


def torchvision_resize(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision Resize(size) of a PIL image (transforms.functional._compute_resized_output_size): the shorter side
    becomes `size`, the longer int(size * long / short) -- truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def torchvision_crop(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision CenterCrop(size): (left, top) = int(round((side - size) / 2.0)), Python's round-half-even."""
    return round((width - size) / 2.0), round((height - size) / 2.0)


# (width, height, R): Li et al.'s 512 on common photo sizes, portrait and landscape, odd differences whose half is
# x.5 (both rounding directions of half-even), and an already square / already sized image
SIZES = [(500, 375, 512), (375, 500, 512), (333, 500, 512), (640, 480, 512), (1000, 999, 512), (513, 512, 512),
         (512, 515, 512), (517, 512, 512), (300, 300, 512), (64, 48, 32), (48, 64, 30), (101, 37, 16)]


@pytest.mark.parametrize(("width", "height", "size"), SIZES)
def test_resize_and_crop_arithmetic_is_torchvisions(width: int, height: int, size: int) -> None:
    assert resized_size(width, height, size) == torchvision_resize(width, height, size)
    new_w, new_h = torchvision_resize(width, height, size)
    assert crop_offsets(new_w, new_h, size) == torchvision_crop(new_w, new_h, size)


def test_resize_and_crop_worked_examples() -> None:
    assert resized_size(500, 375, 512) == (682, 512)  # 512 * 500 / 375 = 682.67 -> 682, not 683
    assert crop_offsets(682, 512, 512) == (85, 0)
    assert crop_offsets(513, 512, 512) == (0, 0)  # round(0.5) = 0
    assert crop_offsets(515, 512, 512) == (2, 0)  # round(1.5) = 2
    assert crop_offsets(517, 512, 512) == (2, 0)  # round(2.5) = 2, not 3


@pytest.mark.parametrize(("width", "height", "size"), [(517, 32, 32), (32, 39, 32), (45, 32, 32)])
def test_centre_crop_takes_the_torchvision_window(width: int, height: int, size: int) -> None:
    """The shorter side is already `size` (no resampling), so every output pixel is an input pixel: column/row
    indices encoded in the colours show which window was taken."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    arr = np.stack([xs % 256, ys % 256, (xs // 256) * 100], axis=-1).astype(np.uint8)
    out = to_model_input(Image.fromarray(arr), size)
    left, top = torchvision_crop(width, height, size)
    expected = arr[top:top + size, left:left + size].astype(np.float32) / 127.5 - 1
    assert out.shape == (3, size, size)
    assert np.array_equal(out, expected.transpose(2, 0, 1))


def test_resized_input_is_bicubic_at_torchvision_size_then_cropped() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((75, 100, 3)) * 255).astype(np.uint8))  # 100 x 75 -> 42 x 32 at R = 32
    new_w, new_h = torchvision_resize(100, 75, 32)
    assert (new_w, new_h) == (42, 32)
    left, top = torchvision_crop(new_w, new_h, 32)
    ref = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + 32, top + 32)),
                     dtype=np.float32) / 127.5 - 1
    assert np.allclose(to_model_input(img, 32), ref.transpose(2, 0, 1), atol=1e-6)


def test_resize_shorter_side_then_centre_crop() -> None:
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 30))  # white centre stripe
    arr = to_model_input(img, 10)
    assert arr.shape == (3, 10, 10)
    assert arr[:, :, 5].mean() > 0.9 and arr[:, :, 0].mean() < -0.5


def test_as_model_input_takes_paths_pil_images_and_arrays(tmp_path) -> None:
    rng = np.random.default_rng(1)
    rgb = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    expected = to_model_input(Image.fromarray(rgb), 16)
    for item in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(rgb), rgb):
        out = as_model_input(item, 16)
        assert out.shape == (3, 16, 16) and out.dtype == np.float32
        assert np.array_equal(out, expected), type(item)
    grey = rgb[..., 0]
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    assert np.array_equal(as_model_input(grey, 16), to_model_input(Image.fromarray(grey_rgb), 16))
    assert np.array_equal(as_model_input(grey[..., None], 16), as_model_input(grey, 16))
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)  # fully transparent: white
    assert np.allclose(as_model_input(rgba, 16), 1.0)
    ready = (rng.random((3, 16, 16)) * 2 - 1).astype(np.float64)
    out = as_model_input(ready, 16)
    assert out.dtype == np.float32 and np.allclose(out, ready) and out.flags["C_CONTIGUOUS"]
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert np.array_equal(as_model_input(Image.open(tmp_path / "p.png"), 16),
                          to_model_input(Image.open(tmp_path / "p.png").convert("RGB"), 16))


@pytest.mark.parametrize(("item", "message"), [
    (np.full((3, 16, 16), 1.5, np.float32), r"finite values in \[-1, 1\]"),
    (np.full((3, 16, 16), np.nan, np.float32), "finite values"),
    (np.zeros((3, 8, 8), np.float32), r"shape \(3, 8, 8\)"),  # preprocessed for another resolution
    (np.zeros((16, 16, 3), np.float32), "dtype float32"),  # a float HWC image is ambiguous
    (np.zeros((16, 16, 3), np.int32), "dtype int32"),
    (np.zeros((16, 16, 2), np.uint8), r"shape \(16, 16, 2\)"),
    (np.zeros((2, 16, 16, 3), np.uint8), "shape"),
    ([[0, 1], [2, 3]], "cannot classify a list"),
    (b"not an image", "cannot read image <bytes>: not an image format"),  # bytes are decoded as an image file
])
def test_as_model_input_rejects_what_it_cannot_take(item: object, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        as_model_input(item, 16)


def test_a_folder_or_missing_file_as_an_image_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(BadInputError, match="is a folder, not an image"):
        as_model_input(tmp_path, 16)
    with pytest.raises(BadInputError, match="is a folder, not an image"):
        load_image(str(tmp_path), 16)
    with pytest.raises(BadInputError, match="image not found"):
        as_model_input(tmp_path / "none.jpg", 16)


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


LI_PETS = (  # the first rows of Li et al.'s prompts/pets_prompts.csv: quoted prompts with commas
    "prompt,classname,classidx\n"
    '"a photo of a Abyssinian cat, a type of pet.",abyssinian,0\n'
    '"a photo of a American Bulldog, a type of pet.",american bulldog,1\n'
    '"a photo of a American Pit Bull Terrier dog, a type of pet.",american pit bull terrier,2\n'
)


def test_read_prompts_file_li_et_als_format(tmp_path) -> None:
    (tmp_path / "pets.csv").write_text(LI_PETS)
    assert read_prompts_file(tmp_path / "pets.csv") == {
        "abyssinian": "a photo of a Abyssinian cat, a type of pet.",
        "american bulldog": "a photo of a American Bulldog, a type of pet.",
        "american pit bull terrier": "a photo of a American Pit Bull Terrier dog, a type of pet.",
    }
    assert list(read_prompts_file(tmp_path / "pets.csv")) == ["abyssinian", "american bulldog",
                                                              "american pit bull terrier"]  # classidx order
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + LI_PETS.replace("\n", "\r\n").encode() + b"\r\n\r\n")
    assert read_prompts_file(tmp_path / "bom.csv") == read_prompts_file(tmp_path / "pets.csv")  # BOM, CRLF, blanks


def test_read_prompts_file_other_layouts(tmp_path) -> None:
    (tmp_path / "two.csv").write_text("cat,a photo of a cat\ngreat pyrenees,\"a photo of a great pyrenees, a dog\"\n")
    assert read_prompts_file(tmp_path / "two.csv") == {"cat": "a photo of a cat",
                                                       "great pyrenees": "a photo of a great pyrenees, a dog"}
    (tmp_path / "cols.csv").write_text("id,Prompt,Class\n0, a cat photo ,cat\n1,a dog photo,dog\n")
    assert read_prompts_file(tmp_path / "cols.csv") == {"cat": "a cat photo", "dog": "a dog photo"}
    (tmp_path / "dup.csv").write_text("cat,a photo of a cat\ncat,a photo of a cat\n")  # a repeat is harmless
    assert read_prompts_file(tmp_path / "dup.csv") == {"cat": "a photo of a cat"}


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"\n  \n,\n", "is empty"),
    (b"prompt,idx\na cat,0\n", "needs both a 'prompt' and a 'classname'"),
    (b"classname,idx\ncat,0\n", "needs both a 'prompt' and a 'classname'"),
    (b"prompt,classname,classidx\na cat,,0\n", "line 2: expected a class and a prompt"),
    (b"prompt,classname,classidx\na cat,cat,0\na dog\n", "line 3: expected a class and a prompt"),
    (b"cat\n", "line 1: expected a class and a prompt"),
    (b"cat,a cat\ncat,another cat\n", "gives class 'cat' two prompts"),
    (b"cat,\xff\xfe a cat\n", "cannot read prompts file"),
])
def test_bad_prompts_files_are_clear_errors(tmp_path, content: bytes, message: str) -> None:
    (tmp_path / "p.csv").write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        read_prompts_file(tmp_path / "p.csv")


def test_bad_prompts_row_names_its_line_in_the_file(tmp_path) -> None:
    (tmp_path / "p.csv").write_text("prompt,classname,classidx\n\na cat,,0\n")
    with pytest.raises(BadInputError, match="line 3: expected a class and a prompt"):
        read_prompts_file(tmp_path / "p.csv")


def test_missing_prompts_file(tmp_path) -> None:
    with pytest.raises(BadInputError, match="prompts file not found"):
        read_prompts_file(tmp_path / "none.csv")
    with pytest.raises(BadInputError, match="prompts file not found"):
        read_prompts_file(tmp_path)  # a folder


def test_li_et_al_prompt_files_keep_classidx_as_identity(tmp_path) -> None:
    """ImageNet's file names two classes twice ("missile", "sunglasses"): every classidx stays a class, in classidx
    order, repeated names told apart and said so."""
    path = tmp_path / "imagenet_prompts.csv"
    path.write_text("prompt,classname,classidx\n"
                    "a photo of a missile,missile,2\n"
                    "a photo of a tench,tench,0\n"
                    "a photo of a missile,missile,1\n"
                    "a photo of a goldfish,goldfish,3\n")
    table = read_prompts_file(path)
    assert list(table) == ["tench", "missile [1]", "missile [2]", "goldfish"]
    assert table["missile [2]"] == "a photo of a missile"
    assert len(table.notes) == 1 and "missile" in table.notes[0]
    plain = tmp_path / "plain.csv"
    plain.write_text("cat,a photo of a cat\ndog,a photo of a dog\n")
    assert dict(read_prompts_file(plain)) == {"cat": "a photo of a cat", "dog": "a photo of a dog"}
    assert read_prompts_file(plain).notes == []
