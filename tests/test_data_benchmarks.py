"""The four FGVC benchmarks read from their real annotation files (placeholder images)."""

from __future__ import annotations

import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from crasmra.data import DatasetRootError, create_dataset, dataset_classes
from crasmra.data.factory import build_split, load_annotations
from data_fixtures import (
    build_aircraft,
    build_cars_devkit,
    build_cars_full,
    build_cub,
    build_dogs,
    fixtures_dir,
    jpeg_bytes,
    place_images,
)


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fixtures_dir()
    base = tmp_path_factory.mktemp("fgvc")
    return {
        "cub": build_cub(base / "cub"),
        "aircraft": build_aircraft(base / "aircraft"),
        "cars": build_cars_devkit(base / "cars"),
        "cars_full": build_cars_full(base / "cars_full"),
        "dogs": build_dogs(base / "dogs"),
    }


OFFICIAL = {
    # name, root key, classes, official train, official test, first class, a later class
    "cub": ("cub", 200, 5994, 5794, "Black footed Albatross", "Common Yellowthroat"),
    "aircraft": ("aircraft", 100, 6667, 3333, "707-320", "Cessna 172"),
    "cars": (
        "cars",
        196,
        8144,
        8041,
        "AM General Hummer SUV 2000",
        "smart fortwo Convertible 2012",
    ),
    "cars_full": (
        "cars",
        196,
        8144,
        8041,
        "AM General Hummer SUV 2000",
        "smart fortwo Convertible 2012",
    ),
    "dogs": ("dogs", 120, 12000, 8580, "Chihuahua", "Japanese spaniel"),
}


@pytest.mark.parametrize("key", list(OFFICIAL))
def test_official_counts_names_and_splits(data_roots: dict[str, Path], key: str) -> None:
    name, n_classes, n_train, n_test, first, other = OFFICIAL[key]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # official files: no count warning
        ann = load_annotations(name, data_roots[key])
    assert (len(ann.classes), len(ann.train), len(ann.test)) == (n_classes, n_train, n_test)
    assert ann.classes[0] == first and other in ann.classes
    assert all("_" not in c for c in ann.classes)
    train = build_split(ann, "train", None)
    val = build_split(ann, "val", None)
    test = build_split(ann, "test", None)
    assert len(train) + len(val) == n_train and len(test) == n_test
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert {p for p, _ in train.samples} | {p for p, _ in val.samples} == {
        r.path for r in ann.train
    }
    # Stratified: every class in val, about 10% of each class.
    per_class = Counter(r.label for r in ann.train)
    val_counts = Counter(val.targets)
    assert set(val_counts) == set(range(n_classes))
    assert all(val_counts[c] == max(1, round(0.1 * n)) for c, n in per_class.items())
    assert train.classes == ann.classes and len(train.targets) == len(train.samples)


def test_items_are_tensors_with_default_transform(data_roots: dict[str, Path]) -> None:
    ds = create_dataset("cub", data_roots["cub"], "test", image_size=32, resize_size=40)
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype.is_floating_point
    assert isinstance(label, int) and label == ds.targets[0]
    train = create_dataset("cub", data_roots["cub"], "train", image_size=(24, 32))
    assert train[0][0].shape == (3, 24, 32)


def test_split_is_seeded(data_roots: dict[str, Path]) -> None:
    ann = load_annotations("aircraft", data_roots["aircraft"])
    a = build_split(ann, "val", None, split_seed=0).samples
    b = build_split(ann, "val", None, split_seed=0).samples
    c = build_split(ann, "val", None, split_seed=1).samples
    assert a == b and a != c and len(a) == len(c)
    big = build_split(ann, "val", None, val_fraction=0.3)
    assert len(big) == sum(round(0.3 * n) for n in Counter(r.label for r in ann.train).values())


def test_val_fraction_zero(data_roots: dict[str, Path]) -> None:
    train = create_dataset("dogs", data_roots["dogs"], "train", val_fraction=0)
    assert len(train) == 12000
    with pytest.raises(ValueError, match="val_fraction=0"):
        create_dataset("dogs", data_roots["dogs"], "val", val_fraction=0)


def test_inner_folder_roots(data_roots: dict[str, Path]) -> None:
    assert len(dataset_classes("cub", data_roots["cub"] / "CUB_200_2011")) == 200
    air = data_roots["aircraft"] / "fgvc-aircraft-2013b"
    assert len(dataset_classes("aircraft", air)) == 100
    assert len(dataset_classes("aircraft", air / "data")) == 100


def test_aircraft_levels_and_official_val(data_roots: dict[str, Path]) -> None:
    root = data_roots["aircraft"]
    family = dataset_classes("aircraft", root, level="family")
    assert len(family) == 70 and "Boeing 707" in family
    assert len(dataset_classes("aircraft", root, level="manufacturer")) == 30
    ann = load_annotations("aircraft", root, official_val=True)
    assert len(build_split(ann, "train", None)) == 3334
    assert len(build_split(ann, "val", None)) == 3333
    with pytest.raises(ValueError, match="level"):
        dataset_classes("aircraft", root, level="model")


def test_cars_layouts_agree(data_roots: dict[str, Path]) -> None:
    devkit = load_annotations("cars", data_roots["cars"])
    full = load_annotations("cars", data_roots["cars_full"])
    assert devkit.classes == full.classes
    assert [r.label for r in devkit.train] == [r.label for r in full.train]
    assert [r.bbox for r in devkit.test] == [r.bbox for r in full.test]
    assert devkit.train[0].bbox == (38.0, 115.0, 569.0, 375.0)  # 00001.jpg: 39,116,569,375


def test_dogs_lists_subfolder(data_roots: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "dogs"
    (root / "lists").mkdir(parents=True)
    for f in ("train_list.mat", "test_list.mat"):
        shutil.copyfile(data_roots["dogs"] / f, root / "lists" / f)
    os.symlink(data_roots["dogs"] / "Images", root / "Images")
    ann = load_annotations("dogs", root)
    assert (len(ann.train), len(ann.test)) == (12000, 8580)


@pytest.mark.parametrize("name", ["cub", "aircraft", "cars", "dogs"])
def test_wrong_root_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetRootError) as info:
        create_dataset(name, tmp_path, "train")
    msg = str(info.value)
    assert "Expected layout" in msg and "http" in msg and str(tmp_path) in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DatasetRootError, match="does not exist"):
        dataset_classes(name, tmp_path / "nope")


def test_wrong_root_names_missing_file(tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011").mkdir()
    (tmp_path / "CUB_200_2011" / "images.txt").write_text("1 001.A/a.jpg\n")
    with pytest.raises(DatasetRootError, match=r"image_class_labels\.txt"):
        dataset_classes("cub", tmp_path)
    with pytest.raises(DatasetRootError, match=r"lists\.tar"):
        (tmp_path / "lists.tar").write_bytes(b"")
        dataset_classes("dogs", tmp_path)
    cars = build_cars_devkit(tmp_path / "cars", images=False)
    (cars / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetRootError, match="withlabels"):
        dataset_classes("cars", cars)


def _small_cub(root: Path, n: int = 40) -> Path:
    """A CUB tree with the first ``n`` rows of the real lists."""
    src = fixtures_dir() / "cub" / "CUB_200_2011"
    dst = root / "CUB_200_2011"
    dst.mkdir(parents=True)
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        lines = (src / f).read_text().splitlines()[:n]
        (dst / f).write_text("\n".join(lines) + "\n")
    shutil.copyfile(src / "classes.txt", dst / "classes.txt")
    return root


def test_missing_images_error_and_skip(tmp_path: Path) -> None:
    root = _small_cub(tmp_path)
    rels = [line.split()[1] for line in (root / "CUB_200_2011/images.txt").read_text().splitlines()]
    place_images(root / "CUB_200_2011/images", rels[3:])
    with pytest.warns(UserWarning, match="official count"), pytest.raises(DatasetRootError) as info:
        create_dataset("cub", root, "test")
    msg = str(info.value)
    assert "3 of 40 images" in msg and rels[0] in msg and rels[2] in msg
    assert "Expected layout" in msg and "caltech" in msg
    with pytest.warns(UserWarning) as record:
        ann = load_annotations("cub", root, skip_bad_images=True)
    assert any("3 of 40 listed images are missing" in str(w.message) for w in record)
    assert len(ann.train) + len(ann.test) == 37
    # Without the images folder at all the error says so.
    shutil.rmtree(root / "CUB_200_2011/images")
    with pytest.warns(UserWarning), pytest.raises(DatasetRootError, match="image folder"):
        load_annotations("cub", root)


def test_count_mismatch_warns_with_both_counts(tmp_path: Path) -> None:
    root = _small_cub(tmp_path)
    rels = [line.split()[1] for line in (root / "CUB_200_2011/images.txt").read_text().splitlines()]
    place_images(root / "CUB_200_2011/images", rels)
    with pytest.warns(UserWarning) as record:
        ann = load_annotations("cub", root)
    n_train = len(ann.train)
    messages = [str(w.message) for w in record]
    assert any(f"found {n_train} training images" in m and "5994" in m for m in messages)
    assert any(f"found {40 - n_train} test images" in m and "5794" in m for m in messages)


def test_cub_bbox_crop(tmp_path: Path) -> None:
    root = _small_cub(tmp_path, n=1)
    rel = (root / "CUB_200_2011/images.txt").read_text().split()[1]
    path = root / "CUB_200_2011/images" / rel
    path.parent.mkdir(parents=True)
    Image.new("RGB", (500, 400), (10, 200, 10)).save(path)
    with pytest.warns(UserWarning, match="official count"):
        ds = create_dataset(
            "cub", root, "test", val_fraction=0, bbox_crop=True, transform=lambda im: im
        )
    assert ds[0][0].size == (325, 304)  # bounding_boxes.txt row 1: x 60, y 27, w 325, h 304
    with pytest.raises(ValueError, match="bbox_crop"):
        create_dataset("dogs", tmp_path, "train", bbox_crop=True)


def test_unknown_name_and_option(data_roots: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        create_dataset("imagenet", data_roots["cub"], "train")
    with pytest.raises(ValueError, match="does not take"):
        create_dataset("cub", data_roots["cub"], "train", levle="family")
    with pytest.raises(ValueError, match="split"):
        create_dataset("cub", data_roots["cub"], "training")
    with pytest.raises(ValueError, match="root"):
        create_dataset("cub", None, "train")


def test_placeholder_is_a_real_jpeg() -> None:
    assert jpeg_bytes()[:2] == b"\xff\xd8"
