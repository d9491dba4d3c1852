"""The shifted digit domains (noop_rt/demo/domains.py): deterministic, balanced, disjoint splits, what their
docstring says they are, and written as image folders `noop-rt train --model demo` takes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from noop_rt.cli import app
from noop_rt.demo import DIGIT_NAMES, domains
from noop_rt.demo.digits import digit_images, split_indices
from noop_rt.runtime.classes import ImageFolder
from noop_rt.runtime.images import as_model_input


@pytest.mark.parametrize("name", list(domains.DOMAINS))
def test_splits_are_deterministic_balanced_and_order_independent(name: str) -> None:
    test_first = domains.domain_images(name, "test")
    train, y_train = domains.domain_images(name, "train")
    val, y_val = domains.domain_images(name, "val")
    test, y_test = domains.domain_images(name, "test")
    assert np.array_equal(test, test_first[0]) and np.array_equal(y_test, test_first[1])  # order does not matter
    for images, labels, per_class in ((train, y_train, domains.TRAIN_POOL), (val, y_val, domains.VAL_PER_CLASS)):
        assert images.shape == (10 * per_class, 16, 16) and images.dtype == np.uint8
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, per_class))
    assert test.shape[1:] == (16, 16) and len(test) == 360
    assert np.bincount(y_test, minlength=10).min() >= 30
    assert not np.array_equal(train[:10], val[:10])


def test_scan_domains_test_on_the_held_out_digits_and_train_on_the_backbone_split() -> None:
    _, labels = digit_images()
    splits = split_indices(labels)
    train = domains._scan_indices(labels, "train")
    val = domains._scan_indices(labels, "val")
    test = domains._scan_indices(labels, "test")
    assert np.array_equal(test, splits["test"])
    assert not set(train) & set(val) and not (set(train) | set(val)) & set(test)
    assert set(train) | set(val) <= set(splits["train"])


def test_domains_look_as_documented() -> None:
    scans, labels = digit_images()
    src = scans[split_indices(labels)["test"]].astype(np.float64)
    inverted, _ = domains.domain_images("inverted_texture", "test")
    ink, background = src > 200, src == 0
    assert inverted[ink].mean() < 40 and inverted[background].min() >= 139  # dark ink, bright 140..240 background
    assert inverted[background].std() > 15  # textured, not flat
    thick, _ = domains.domain_images("thick_affine", "test")
    moved = np.abs(thick.astype(np.float64) - src).mean(axis=(1, 2))
    assert np.median(moved) > 30  # every digit is geometrically changed
    printed, y = domains.domain_images("printed", "test")
    assert (printed.max(axis=(1, 2)) > 128).all()  # inked
    rows, cols = np.mgrid[:16, :16]
    mass = printed.astype(np.float64).sum(axis=(1, 2))
    cy = (printed * rows).sum(axis=(1, 2)) / mass
    cx = (printed * cols).sum(axis=(1, 2)) / mass
    assert np.abs(cy - 7.5).max() < 3 and np.abs(cx - 7.5).max() < 3  # centred on the ink, +-1 px shift
    ones, eights = printed[y == 1].mean(), printed[y == 8].mean()
    assert eights > ones  # a typeset 8 carries more ink than a 1


def test_write_domain_gives_image_folders_that_load_as_the_arrays(tmp_path) -> None:
    counts = domains.write_domain("thick_affine", tmp_path, splits=("val",))
    assert counts == {"val": 10 * domains.VAL_PER_CLASS}
    folder = ImageFolder.scan(tmp_path / "val")
    assert sorted(folder.classes) == sorted(DIGIT_NAMES) and len(folder) == counts["val"]
    x, y = domains.domain_arrays("thick_affine", "val")
    path = sorted((tmp_path / "val" / DIGIT_NAMES[int(y[3])]).iterdir())[0]
    first_of_class = int(np.flatnonzero(y == y[3])[0])
    assert path.name == f"{first_of_class:04d}.png"
    assert np.array_equal(as_model_input(path, 16), x[first_of_class])
    assert np.array_equal(np.asarray(Image.open(path)), domains.domain_images("thick_affine", "val")[0][first_of_class])


def test_noop_rt_train_takes_a_written_domain(tmp_path) -> None:
    domains.write_domain("printed", tmp_path / "printed", splits=("train", "val"))
    for folder in (tmp_path / "printed" / "val").iterdir():  # 3 validation images per class keep the run short
        for extra in sorted(folder.iterdir())[3:]:
            extra.unlink()
    out = tmp_path / "printed.pt"
    res = CliRunner().invoke(app, ["train", "--model", "demo", "--data", str(tmp_path / "printed"), "--shots", "1",
                                   "--epochs", "1", "--timestep", "300", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["classes"] == 10 and summary["train_images"] == 10
    assert summary["val_images"] == 30 and out.is_file()


def test_unknown_domain_or_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        domains.domain_images("sketch", "test")
    with pytest.raises(ValueError, match="unknown split"):
        domains.domain_images("printed", "holdout")
