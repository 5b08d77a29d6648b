"""Hostile dataset trees: link loops, entries that are no images, damaged annotation files.

Each case ends either in a clean dataset (loops skipped with a warning) or in one line
``crasmra: error: ...`` with exit status 2 that names the file (and line) and says what to
change. The command-line cases run the real ``crasmra fit`` with the tiny config.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import run_cli, tiny_fit_args
from crasmra.data import DatasetRootError, FGVCImageDataset, ImageLoadError, load_image
from crasmra.data.base import Record
from crasmra.data.factory import load_annotations
from crasmra.errors import CrasmraError
from data_fixtures import build_aircraft, fixtures_dir, place_images

FIT_FAST = ("--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")


def _fit(run: Path, dataset: str, root: Path, *extra: str) -> int:
    """``crasmra fit`` of the tiny model on a file dataset."""
    args = (f"--data.dataset={dataset}", f"--data.root={root}", "--data.options=null")
    return run_cli(tiny_fit_args(run, *args, *FIT_FAST, *extra))


def _one_error_line(err: str) -> str:
    """The single ``crasmra: error:`` line of a failed run's stderr."""
    lines = [line for line in err.splitlines() if line.startswith("crasmra: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _two_class_folder(root: Path, n: int = 10) -> Path:
    rels = [f"train/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(n)]
    place_images(root, rels + [f"test/{c}/0.jpg" for c in ("cat", "dog")])
    return root


# --------------------------------------------------------------------------- link loops


def _looped_folder(root: Path) -> Path:
    """20 train images; ``cat/loop -> ..`` and ``dog/self -> .`` as in the review."""
    _two_class_folder(root)
    os.symlink("..", root / "train/cat/loop")
    os.symlink(".", root / "train/dog/self")
    return root


def test_folder_link_loops_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _looped_folder(tmp_path)
    os.symlink("0.jpg", root / "train/cat/alias.jpg")  # inside its class: kept, once
    os.symlink("../cat/1.jpg", root / "train/dog/stolen.jpg")  # leaves its class: skipped
    with caplog.at_level(logging.WARNING, logger="crasmra"):
        ann = load_annotations("folder", root)
    assert len(ann.train) == 20  # the old scan listed thousands, labelled "cat" through loop/
    assert len({r.path for r in ann.train}) == 20
    for r in ann.train:
        assert Path(r.path).parent.name == ann.classes[r.label]
    logged = caplog.text
    assert str(root / "train/cat/loop") in logged and "outside its class folder" in logged
    assert str(root / "train/dog/self") in logged and "directory loop" in logged
    assert str(root / "train/dog/stolen.jpg") in logged


def test_fit_on_a_folder_with_link_loops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _looped_folder(tmp_path / "data")
    assert _fit(tmp_path / "run", "folder", root) == 0
    err = capsys.readouterr().err
    assert f"skipping {root / 'train/cat/loop'}" in err
    assert f"skipping {root / 'train/dog/self'}" in err


# --------------------------------------------------------------------------- non-images


def _plant(path: Path, kind: str) -> None:
    """Put a non-image named like an image at ``path``."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 20)  # /etc/passwd, renamed
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.symlink("/dev/urandom", path)


NON_IMAGES = {
    "empty": "the file is empty (0 bytes)",
    "text": "not a recognised image format",
    "directory": "not a regular file but a directory",
    "fifo": "not a regular file but a FIFO",
    "device": "it links to /dev/urandom, not a regular file but a character device",
}
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


@needs_fifo
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(NON_IMAGES))
def test_fit_refuses_a_non_image_in_one_line(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _two_class_folder(tmp_path / "data")
    bad = root / "train/cat/x.jpg"
    _plant(bad, kind)
    code = _fit(tmp_path / "run", "folder", root, "--trainer.limit_train_batches=1.0")
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"cannot load image '{bad}'" in line and NON_IMAGES[kind] in line


@needs_fifo
@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_folder_scan_refuses_entries_that_are_not_regular_files(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _two_class_folder(tmp_path)
    _plant(root / "train/cat/x.jpg", kind)
    with pytest.raises(ImageLoadError, match=r"x\.jpg.*not a regular file") as info:
        load_annotations("folder", root)  # at scan time: nothing is opened
    assert isinstance(info.value, CrasmraError) and "skip_bad_images" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="crasmra"):
        ann = load_annotations("folder", root, skip_bad_images=True)
    assert len(ann.train) == 20 and "x.jpg" in caplog.text


@needs_fifo
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_csv_and_decoder_refuse_entries_that_are_not_regular_files(
    kind: str, tmp_path: Path
) -> None:
    place_images(tmp_path, [f"{i}.jpg" for i in range(4)])
    _plant(tmp_path / "x.jpg", kind)
    (tmp_path / "data.csv").write_text(
        "".join(f"{i}.jpg,{'ab'[i % 2]},train\n" for i in range(4)) + "x.jpg,a,test\n"
    )
    with pytest.raises(ImageLoadError, match=r"x\.jpg.*not a regular file"):
        load_annotations("csv", tmp_path / "data.csv")
    with pytest.warns(UserWarning, match=r"x\.jpg"):
        ann = load_annotations("csv", tmp_path / "data.csv", skip_bad_images=True)
    assert len(ann.train) == 4 and not ann.test
    # Listed with check_files=False, the decoder refuses it without opening it: a FIFO
    # would block and /dev/urandom never end.
    ann = load_annotations("csv", tmp_path / "data.csv", check_files=False)
    with pytest.raises(ImageLoadError, match=r"x\.jpg.*not a regular file"):
        FGVCImageDataset(ann.test, ann.classes).load(0)
    with pytest.raises(ImageLoadError, match=r"x\.jpg.*not a regular file"):
        load_image(tmp_path / "x.jpg")


@pytest.mark.timeout(120)
def test_a_bad_image_in_a_loader_worker_stays_an_image_load_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    loader = DataLoader(FGVCImageDataset([Record(str(bad), 0)], ["a"]), num_workers=1)
    with pytest.raises(ImageLoadError) as info:
        next(iter(loader))  # torch re-raises the worker's error as type(text)
    assert info.value.path == str(bad) and "not a recognised image format" in info.value.reason
    # Through the command line with loader workers: one line, exit 2 (was a traceback, exit 1).
    root = _two_class_folder(tmp_path / "data")
    shutil.copyfile(bad, root / "train/cat/x.jpg")
    code = _fit(
        tmp_path / "run",
        "folder",
        root,
        "--trainer.limit_train_batches=1.0",
        "--data.num_workers=1",
        "--data.persistent_workers=false",
    )
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "x.jpg" in line and "not a recognised image format" in line


# --------------------------------------------------------------------------- csv


def _csv_set(root: Path, labels: list[str], data: bytes | None = None) -> Path:
    place_images(root / "imgs", [f"{i}.jpg" for i in range(len(labels))])
    text = "".join(f"imgs/{i}.jpg,{lab}\n" for i, lab in enumerate(labels))
    (root / "train.csv").write_bytes(data if data is not None else text.encode())
    return root / "train.csv"


def test_csv_mixing_ids_and_names_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv_path = _csv_set(tmp_path / "data", ["dog", "01"] * 5)
    assert _fit(tmp_path / "run", "csv", csv_path) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "mix integer class ids ('01' at" in line and f"{csv_path}:2" in line
    assert "class names ('dog' at" in line and f"{csv_path}:1" in line
    assert "use one kind in every row" in line and "never occurs" not in line


def test_csv_that_is_not_utf8_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = ("dog", "caf\u00e9")
    text = "".join(f"imgs/{i}.jpg,{names[i % 2]}\n" for i in range(6))
    csv_path = _csv_set(tmp_path / "data", ["x"] * 6, data=text.encode("latin-1"))
    assert _fit(tmp_path / "run", "csv", csv_path) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{csv_path}:2: not UTF-8 text (byte 0xe9)" in line and "iconv" in line


def test_csv_with_one_class_is_refused_by_us(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv_path = _csv_set(tmp_path / "data", ["cat"] * 8)
    assert _fit(tmp_path / "run", "csv", csv_path) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(csv_path) in line and "one class ('cat')" in line and "at least 2 classes" in line
    assert "num_classes" not in line  # torchmetrics' wording


def test_folder_with_one_class_is_refused_by_us(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    place_images(tmp_path / "data", [f"train/cat/{i}.jpg" for i in range(8)] + ["test/cat/0.jpg"])
    assert _fit(tmp_path / "run", "folder", tmp_path / "data") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "one class ('cat')" in line and "at least 2 classes" in line


def test_csv_test_label_not_in_train_names_file_and_line(tmp_path: Path) -> None:
    _csv_set(tmp_path, ["a", "b"] * 3)
    (tmp_path / "test.csv").write_text("imgs/0.jpg,a\n\nimgs/1.jpg,zebra\n")
    with pytest.raises(DatasetRootError, match=r"test\.csv:3: test label 'zebra' never occurs"):
        load_annotations("csv", tmp_path / "train.csv")
    # Ids are numbers on both sides: "01" in test is class 1 of train.
    _csv_set(tmp_path, ["0", "1"] * 3)
    (tmp_path / "test.csv").write_text("imgs/0.jpg,01\n")
    assert load_annotations("csv", tmp_path / "train.csv").test[0].label == 1


# --------------------------------------------------------------------------- benchmarks


def _cub(root: Path, n: int = 12) -> Path:
    """The first ``n`` rows of the real CUB lists under ``root/CUB_200_2011`` (no images)."""
    src = fixtures_dir() / "cub" / "CUB_200_2011"
    dst = root / "CUB_200_2011"
    dst.mkdir(parents=True)
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        (dst / f).write_text("\n".join((src / f).read_text().splitlines()[:n]) + "\n")
    shutil.copyfile(src / "classes.txt", dst / "classes.txt")
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_cub_class_id_missing_from_classes_txt(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cub = _cub(tmp_path / "data")
    _edit(cub / "image_class_labels.txt", "\n7 1\n", "\n7 777\n")
    assert _fit(tmp_path / "run", "cub", tmp_path / "data", "--data.options.check_files=false") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "image_class_labels.txt uses 1 class id(s)" in line and "classes.txt" in line
    assert "777 (image 7)" in line


CUB_DAMAGE = [
    (
        "image_class_labels.txt",
        "\n5 1\n",
        "\n5 x\n",
        r"image_class_labels\.txt:5: expected an integer class id after id 5, got 'x'",
    ),
    ("images.txt", "\n3 ", "\n4 ", r"images\.txt lists 1 id\(s\) more than once: 4 \(lines 3, 4\)"),
    (
        "image_class_labels.txt",
        "\n12 1",
        "\n",
        r"1 id\(s\) of images\.txt have no line in image_class_labels\.txt: 12",
    ),
    (
        "train_test_split.txt",
        "\n12 ",
        "\n99 ",
        r"split\.txt: 12; 1 id\(s\) of train_test_split\.txt are not in images\.txt: 99",
    ),
    (
        "train_test_split.txt",
        "\n4 ",
        "\n4 2\n40 ",
        r"train_test_split\.txt:4: expected 1 \(train\) or 0 \(test\)",
    ),
    ("classes.txt", "\n3 ", "\nthree ", r"classes\.txt:3: expected an integer class id"),
    ("bounding_boxes.txt", "\n2 ", "\n2 nan? ", r"bounding_boxes\.txt:2: expected 4 numbers"),
]


@pytest.mark.parametrize(("name", "old", "new", "message"), CUB_DAMAGE)
def test_cub_damaged_lists_name_file_line_and_ids(
    name: str, old: str, new: str, message: str, tmp_path: Path
) -> None:
    cub = _cub(tmp_path)
    _edit(cub / name, old, new)
    with pytest.raises(DatasetRootError, match=message):
        load_annotations("cub", tmp_path, check_files=False)


def test_cub_lists_at_most_a_few_ids(tmp_path: Path) -> None:
    cub = _cub(tmp_path, n=40)
    lines = (cub / "image_class_labels.txt").read_text().splitlines()
    (cub / "image_class_labels.txt").write_text("\n".join(lines[:20]) + "\n")
    with pytest.raises(DatasetRootError, match=r": 21, 22, 23, 24, 25 and 15 more\. "):
        load_annotations("cub", tmp_path, check_files=False)


def test_aircraft_damaged_lists(tmp_path: Path) -> None:
    root = build_aircraft(tmp_path, images=False)
    data = root / "fgvc-aircraft-2013b/data"
    test_list = data / "images_variant_test.txt"
    first = test_list.read_text().splitlines()[0]
    _edit(test_list, first, first.split()[0] + " Concorde-2")
    with pytest.raises(DatasetRootError, match=r"images_variant_test\.txt:1: expected a variant"):
        load_annotations("aircraft", root, check_files=False)
    _edit(test_list, first.split()[0] + " Concorde-2", first)
    trainval = data / "images_variant_trainval.txt"
    trainval.write_text(trainval.read_text() + first + "\n")
    with pytest.raises(
        DatasetRootError, match=rf"both .*trainval\.txt and .*test\.txt: {first.split()[0]}"
    ):
        load_annotations("aircraft", root, check_files=False)
    trainval.write_text(trainval.read_text() + first + "\n")
    with pytest.raises(DatasetRootError, match="more than once"):
        load_annotations("aircraft", root, check_files=False)


def _dogs_lists(root: Path, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> Path:
    import scipy.io

    for name, rows in (("train_list.mat", train), ("test_list.mat", test)):
        files = np.array([f for f, _ in rows], dtype=object)
        scipy.io.savemat(str(root / name), {"file_list": files, "labels": [[c] for _, c in rows]})
    return root


def test_dogs_and_cars_damaged_lists(tmp_path: Path) -> None:
    import scipy.io

    a, b = "n02085620-Chihuahua/a.jpg", "n02085782-Japanese_spaniel/b.jpg"
    _dogs_lists(tmp_path, [(a, 1), (b, 0)], [(a, 1)])
    with pytest.raises(
        DatasetRootError, match=r"train_list\.mat has 1 class id\(s\) outside >= 1: 0 \("
    ):
        load_annotations("dogs", tmp_path, check_files=False)
    _dogs_lists(tmp_path, [(a, 1), (b, 2)], [(a, 1)])
    with pytest.raises(DatasetRootError, match=r"both .*train_list\.mat and .*test_list\.mat: n02"):
        load_annotations("dogs", tmp_path, check_files=False)
    cars = tmp_path / "cars"
    cars.mkdir()
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.empty((1, 2), dtype=[(f, object) for f in fields])
    ann[0, 0] = ("car_ims/1.jpg", 1, 1, 5, 5, 1, 0)
    ann[0, 1] = ("car_ims/2.jpg", 1, 1, 5, 5, 3, 1)
    names = np.array(["Car A", "Car B"], dtype=object)
    scipy.io.savemat(str(cars / "cars_annos.mat"), {"annotations": ann, "class_names": names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official-count warnings
        with pytest.raises(
            DatasetRootError,
            match=r"cars_annos\.mat has 1 class id\(s\) outside 1\.\.2: 3 \(car_ims/2\.jpg\)",
        ):
            load_annotations("cars", cars, check_files=False)
