"""The "folder" and "csv" datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from crasmra.data import DatasetRootError, create_dataset, dataset_classes
from data_fixtures import place_images


def _folder_tree(root: Path, with_val: bool = False) -> Path:
    rels = [f"train/{c}/{i}.jpg" for c in ("b_cls", "a_cls", "c_cls") for i in range(10)]
    rels += [f"test/{c}/{i}.png" for c in ("a_cls", "c_cls") for i in range(3)]
    if with_val:
        rels += [f"val/{c}/{i}.jpg" for c in ("a_cls", "b_cls") for i in range(2)]
    place_images(root, rels)
    (root / "train" / "a_cls" / "notes.txt").write_text("not an image")
    return root


def test_folder_dataset(tmp_path: Path) -> None:
    root = _folder_tree(tmp_path)
    train = create_dataset("folder", root, "train", image_size=8, resize_size=10)
    val = create_dataset("folder", root, "val", image_size=8, resize_size=10)
    test = create_dataset("folder", root, "test", image_size=8, resize_size=10)
    assert train.classes == ["a_cls", "b_cls", "c_cls"]
    assert (len(train), len(val), len(test)) == (27, 3, 6)
    assert sorted(val.targets) == [0, 1, 2]
    assert train[0][0].shape == (3, 8, 8)


def test_folder_with_val_dir(tmp_path: Path) -> None:
    root = _folder_tree(tmp_path, with_val=True)
    assert len(create_dataset("folder", root, "train")) == 30
    assert len(create_dataset("folder", root, "val")) == 4


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetRootError, match="train/"):
        dataset_classes("folder", tmp_path)
    place_images(tmp_path, ["train/a/1.jpg", "train/b/1.jpg", "test/zzz/1.jpg"])
    with pytest.raises(DatasetRootError, match="zzz"):
        create_dataset("folder", tmp_path, "test")


def test_csv_with_split_column_and_header(tmp_path: Path) -> None:
    place_images(tmp_path / "imgs", [f"{i}.jpg" for i in range(30)])
    rows = ["path,label,split"]
    rows += [f"imgs/{i}.jpg,{['sparrow', 'finch'][i % 2]},train" for i in range(20)]
    rows += [f"imgs/{i}.jpg,{['sparrow', 'finch'][i % 2]},test" for i in range(20, 26)]
    rows += [f"imgs/{i}.jpg,{['sparrow', 'finch'][i % 2]},val" for i in range(26, 30)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    train = create_dataset("csv", tmp_path / "data.csv", "train", image_size=8, resize_size=8)
    assert train.classes == ["finch", "sparrow"]
    assert len(train) == 20 and len(create_dataset("csv", tmp_path / "data.csv", "val")) == 4
    assert len(create_dataset("csv", tmp_path / "data.csv", "test")) == 6
    assert train.samples[0][0] == str((tmp_path / "imgs/0.jpg").resolve())


def test_csv_without_header_with_sibling_test_file(tmp_path: Path) -> None:
    place_images(tmp_path / "sub", [f"{i}.jpg" for i in range(24)])
    (tmp_path / "train.csv").write_text("".join(f"sub/{i}.jpg,{i % 3}\n" for i in range(18)))
    (tmp_path / "test.csv").write_text("".join(f"sub/{i}.jpg,{i % 3}\n" for i in range(18, 24)))
    train = create_dataset("csv", tmp_path / "train.csv", "train", val_fraction=0.2)
    val = create_dataset("csv", tmp_path / "train.csv", "val", val_fraction=0.2)
    test = create_dataset("csv", tmp_path / "train.csv", "test")
    assert train.classes == ["0", "1", "2"] and (len(train), len(val), len(test)) == (15, 3, 6)
    assert test.targets == [i % 3 for i in range(18, 24)]


def test_csv_errors(tmp_path: Path) -> None:
    place_images(tmp_path, ["a.jpg"])
    (tmp_path / "labels.csv").write_text("a.jpg,cat\nmissing.jpg,dog\n")
    with pytest.raises(DatasetRootError, match=r"missing\.jpg"):
        create_dataset("csv", tmp_path / "labels.csv", "train")
    (tmp_path / "labels.csv").write_text("a.jpg,cat\na.jpg,dog\n")
    with pytest.raises(DatasetRootError, match="no test set"):
        create_dataset("csv", tmp_path / "labels.csv", "test")
    with pytest.raises(DatasetRootError, match="not a file"):
        create_dataset("csv", tmp_path, "train")
