"""Annotation readers of the four FGVC benchmarks in their official layouts."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crasmra.data.base import Annotations, Record, check_files_exist, warn_count
from crasmra.data.errors import DatasetRootError

__all__ = ["BENCHMARKS", "OFFICIAL_COUNTS", "load_benchmark"]

logger = logging.getLogger(__name__)

OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    "cub": {"classes": 200, "train": 5994, "test": 5794},
    "aircraft": {"classes": 100, "train": 6667, "test": 3333},
    "cars": {"classes": 196, "train": 8144, "test": 8041},
    "dogs": {"classes": 120, "train": 12000, "test": 8580},
}

URLS = {
    "cub": "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    "aircraft": "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)",
    "cars": (
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_train.tgz, cars_test.tgz, "
        "car_devkit.tgz, cars_test_annos_withlabels.mat; or car_ims.tgz + cars_annos.mat); "
        "the original server is often offline, torchvision's StanfordCars docs list mirrors"
    ),
    "dogs": "http://vision.stanford.edu/aditya86/ImageNetDogs/ (images.tar, lists.tar)",
}

LAYOUTS = {
    "cub": """\
  <root>/CUB_200_2011/            (or pass CUB_200_2011/ itself as root)
      images.txt
      image_class_labels.txt
      train_test_split.txt
      classes.txt
      bounding_boxes.txt          (needed for bbox_crop=True)
      images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...""",
    "aircraft": """\
  <root>/fgvc-aircraft-2013b/data/   (or pass fgvc-aircraft-2013b/ or its data/ as root)
      variants.txt  families.txt  manufacturers.txt
      images_variant_{train,val,trainval,test}.txt   (likewise _family_, _manufacturer_)
      images_box.txt                                 (needed for bbox_crop=True)
      images/1025794.jpg ...""",
    "cars": """\
  devkit layout:                      full-archive layout:
  <root>/devkit/cars_meta.mat         <root>/cars_annos.mat
  <root>/devkit/cars_train_annos.mat  <root>/car_ims/000001.jpg ...
  <root>/cars_test_annos_withlabels.mat   (or under devkit/)
  <root>/cars_train/00001.jpg ...
  <root>/cars_test/00001.jpg ...""",
    "dogs": """\
  <root>/train_list.mat  <root>/test_list.mat   (or under <root>/lists/; extract lists.tar)
  <root>/Images/n02085620-Chihuahua/n02085620_5927.jpg ...""",
}


def _layout_error(name: str, root: Path, missing: list[str], hint: str = "") -> DatasetRootError:
    where = (
        f"{root} does not exist"
        if not root.exists()
        else f"{root} is not a {name} root: missing " + ", ".join(missing)
    )
    return DatasetRootError(
        f"{name}: {where}.{(' ' + hint) if hint else ''}\n"
        f"Expected layout:\n{LAYOUTS[name]}\n"
        f"The data comes from {URLS[name]}."
    )


def _find_base(root: Path, candidates: list[str], marker: str) -> Path | None:
    """The first ``root/candidate`` that contains ``marker``."""
    for sub in candidates:
        base = root / sub if sub else root
        if (base / marker).is_file():
            return base
    return None


def _require(name: str, root: Path, base: Path, files: list[str]) -> None:
    missing = [f for f in files if not (base / f).exists()]
    if missing:
        raise _layout_error(name, root, [str(base / f) for f in missing])


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines ``key value...`` split on the first whitespace; blank lines skipped."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DatasetRootError(f"{path}:{lineno}: expected 'key value', got {line!r}")
            out.append((parts[0], parts[1]))
    return out


def _finish(
    name: str,
    root: Path,
    classes: list[str],
    train: list[Record],
    test: list[Record],
    *,
    skip_bad_images: bool,
    check_files: bool,
    image_dir: Path,
    val: list[Record] | None = None,
    official_val_train: list[Record] | None = None,
    official_classes: int | None = None,
) -> Annotations:
    """Count warnings and the image-existence check shared by the four benchmarks."""
    official = OFFICIAL_COUNTS[name]
    warn_count(name, "classes", len(classes), official_classes or official["classes"])
    warn_count(name, "training images", len(train), official["train"])
    warn_count(name, "test images", len(test), official["test"])
    if check_files:
        if not image_dir.is_dir():
            raise _layout_error(name, root, [f"the image folder {image_dir}"])
        everything = [r.path for r in (*train, *test, *(val or []), *(official_val_train or []))]
        missing = check_files_exist(
            list(dict.fromkeys(everything)),
            dataset=name,
            layout=LAYOUTS[name],
            url=URLS[name],
            root=root,
            allow_missing=skip_bad_images,
        )
        if missing:

            def keep(rs: list[Record] | None) -> list[Record] | None:
                return None if rs is None else [r for r in rs if r.path not in missing]

            train, test = keep(train), keep(test)  # type: ignore[assignment]
            val, official_val_train = keep(val), keep(official_val_train)
    return Annotations(name, root, classes, train, test, val, official_val_train)


# --------------------------------------------------------------------------- CUB-200-2011


def _cub_class_name(folder: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return re.sub(r"^\d+\.", "", folder).replace("_", " ").strip()


def load_cub(root: Path, *, skip_bad_images: bool = False, check_files: bool = True) -> Annotations:
    """CUB-200-2011: 200 bird species, 5994 train / 5794 test; boxes as x, y, w, h."""
    base = _find_base(root, ["CUB_200_2011", ""], "images.txt")
    if base is None:
        raise _layout_error("cub", root, ["CUB_200_2011/images.txt"])
    _require(
        "cub",
        root,
        base,
        ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"],
    )
    images = dict(_read_pairs(base / "images.txt"))
    labels = {k: int(v) for k, v in _read_pairs(base / "image_class_labels.txt")}
    is_train = {k: v.strip() == "1" for k, v in _read_pairs(base / "train_test_split.txt")}
    class_rows = sorted(((int(k), v) for k, v in _read_pairs(base / "classes.txt")))
    classes = [_cub_class_name(v) for _, v in class_rows]
    index_of = {cid: i for i, (cid, _) in enumerate(class_rows)}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if (base / "bounding_boxes.txt").is_file():
        for k, v in _read_pairs(base / "bounding_boxes.txt"):
            x, y, w, h = (float(t) for t in v.split())
            boxes[k] = (x, y, x + w, y + h)
    train: list[Record] = []
    test: list[Record] = []
    image_dir = str(base / "images")
    for img_id, rel in images.items():
        if img_id not in labels or img_id not in is_train:
            raise DatasetRootError(
                f"cub: image id {img_id} of images.txt has no row in "
                "image_class_labels.txt / train_test_split.txt (mixed releases?)"
            )
        rec = Record(os.path.join(image_dir, rel), index_of[labels[img_id]], boxes.get(img_id))
        (train if is_train[img_id] else test).append(rec)
    return _finish(
        "cub",
        root,
        classes,
        train,
        test,
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=base / "images",
    )


# --------------------------------------------------------------------------- FGVC-Aircraft

AIRCRAFT_LEVELS = {"variant": "variants", "family": "families", "manufacturer": "manufacturers"}
AIRCRAFT_CLASS_COUNTS = {"variant": 100, "family": 70, "manufacturer": 30}


def load_aircraft(
    root: Path,
    *,
    level: str = "variant",
    official_val: bool = False,
    skip_bad_images: bool = False,
    check_files: bool = True,
) -> Annotations:
    """FGVC-Aircraft 2013b at ``level`` variant (100), family (70) or manufacturer (30).

    "train" and "val" come from the official trainval list (6667) with a seeded stratified
    val, like the other sets; ``official_val=True`` uses the official train (3334) / val
    (3333) lists instead. Boxes from images_box.txt (1-based, inclusive corners).
    """
    if level not in AIRCRAFT_LEVELS:
        raise ValueError(f"aircraft level must be one of {sorted(AIRCRAFT_LEVELS)}, got {level!r}")
    base = _find_base(root, ["fgvc-aircraft-2013b/data", "data", ""], "variants.txt")
    if base is None:
        raise _layout_error("aircraft", root, ["fgvc-aircraft-2013b/data/variants.txt"])
    names_file = f"{AIRCRAFT_LEVELS[level]}.txt"
    lists = ["trainval", "test"] + (["train", "val"] if official_val else [])
    _require("aircraft", root, base, [names_file, *(f"images_{level}_{s}.txt" for s in lists)])
    with open(base / names_file, encoding="utf-8") as fh:
        classes = [line.strip() for line in fh if line.strip()]
    index_of = {c: i for i, c in enumerate(classes)}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if (base / "images_box.txt").is_file():
        for k, v in _read_pairs(base / "images_box.txt"):
            x1, y1, x2, y2 = (float(t) for t in v.split())
            boxes[k] = (x1 - 1, y1 - 1, x2, y2)

    image_dir = str(base / "images")

    def read(split: str) -> list[Record]:
        path = base / f"images_{level}_{split}.txt"
        out = []
        for img_id, cls in _read_pairs(path):
            if cls not in index_of:
                raise DatasetRootError(f"aircraft: {path} names {cls!r}, not in {names_file}")
            out.append(
                Record(os.path.join(image_dir, f"{img_id}.jpg"), index_of[cls], boxes.get(img_id))
            )
        return out

    return _finish(
        "aircraft",
        root,
        classes,
        read("trainval"),
        read("test"),
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=base / "images",
        val=read("val") if official_val else None,
        official_val_train=read("train") if official_val else None,
        official_classes=AIRCRAFT_CLASS_COUNTS[level],
    )


# --------------------------------------------------------------------------- Stanford Cars


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises several unrelated types for a bad .mat
        raise DatasetRootError(f"cannot read {path}: {err} (re-download it?)") from err


def _str_list(values: object) -> list[str]:
    return [str(v).strip() for v in np.atleast_1d(values)]


def _cars_boxes(ann: np.ndarray) -> list[tuple[float, float, float, float]]:
    cols = [
        np.atleast_1d(ann[f]).astype(np.float64)
        for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
    ]
    return [(x1 - 1, y1 - 1, x2, y2) for x1, y1, x2, y2 in zip(*cols, strict=True)]


def load_cars(
    root: Path, *, skip_bad_images: bool = False, check_files: bool = True
) -> Annotations:
    """Stanford Cars, devkit layout or full-archive (cars_annos.mat + car_ims/) layout."""
    base = _find_base(root, ["", "stanford_cars"], "devkit/cars_meta.mat")
    if base is not None:
        label_file = _find_base(base, ["", "devkit"], "cars_test_annos_withlabels.mat")
        _require("cars", root, base, ["devkit/cars_train_annos.mat"])
        if label_file is None:
            raise _layout_error(
                "cars",
                root,
                [str(base / "cars_test_annos_withlabels.mat")],
                hint="The devkit's cars_test_annos.mat has no labels; the labelled test "
                "annotations were released separately as cars_test_annos_withlabels.mat.",
            )
        classes = _str_list(_loadmat(base / "devkit/cars_meta.mat")["class_names"])

        def image_dir(split: str) -> Path:
            # Kaggle's re-upload nests cars_train/cars_train/.
            nested = base / split / split
            return nested if nested.is_dir() else base / split

        def read(mat: Path, folder: Path) -> list[Record]:
            ann = _loadmat(mat)["annotations"]
            labels = np.atleast_1d(ann["class"]).astype(np.int64) - 1
            names = _str_list(ann["fname"])
            return [
                Record(os.path.join(folder, f), int(c), b)
                for f, c, b in zip(names, labels, _cars_boxes(ann), strict=True)
            ]

        train_dir, test_dir = image_dir("cars_train"), image_dir("cars_test")
        train = read(base / "devkit/cars_train_annos.mat", train_dir)
        test = read(label_file / "cars_test_annos_withlabels.mat", test_dir)
        if check_files and not test_dir.is_dir():
            raise _layout_error("cars", root, [f"the image folder {test_dir}"])
        return _finish(
            "cars",
            root,
            classes,
            train,
            test,
            skip_bad_images=skip_bad_images,
            check_files=check_files,
            image_dir=train_dir,
        )
    base = _find_base(root, ["", "stanford_cars"], "cars_annos.mat")
    if base is None:
        raise _layout_error(
            "cars", root, ["devkit/cars_meta.mat (devkit layout) or cars_annos.mat (full archive)"]
        )
    mat = _loadmat(base / "cars_annos.mat")
    classes = _str_list(mat["class_names"])
    ann = mat["annotations"]
    labels = np.atleast_1d(ann["class"]).astype(np.int64) - 1
    is_test = np.atleast_1d(ann["test"]).astype(bool)
    paths = _str_list(ann["relative_im_path"])
    train, test = [], []
    for p, c, t, b in zip(paths, labels, is_test, _cars_boxes(ann), strict=True):
        (test if t else train).append(Record(os.path.join(base, p), int(c), b))
    return _finish(
        "cars",
        root,
        classes,
        train,
        test,
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=base / "car_ims",
    )


# --------------------------------------------------------------------------- Stanford Dogs


def _dog_class_name(folder: str) -> str:
    """``n02085782-Japanese_spaniel`` -> ``Japanese spaniel``."""
    return folder.split("-", 1)[-1].replace("_", " ").strip()


def load_dogs(
    root: Path, *, skip_bad_images: bool = False, check_files: bool = True
) -> Annotations:
    """Stanford Dogs: 120 breeds, 12000 train / 8580 test, lists at root or under lists/."""
    base = _find_base(root, ["", "lists"], "train_list.mat")
    if base is None:
        tar_hint = (
            "Found lists.tar: extract it (tar xf lists.tar) next to Images/."
            if (root / "lists.tar").is_file()
            else ""
        )
        raise _layout_error("dogs", root, ["train_list.mat (or lists/train_list.mat)"], tar_hint)
    _require("dogs", root, base, ["test_list.mat"])
    image_root = root / "Images"

    def read(name: str) -> tuple[list[str], np.ndarray]:
        mat = _loadmat(base / name)
        return _str_list(mat["file_list"]), np.atleast_1d(mat["labels"]).astype(np.int64) - 1

    train_files, train_labels = read("train_list.mat")
    test_files, test_labels = read("test_list.mat")
    names: dict[int, str] = {}
    for f, c in zip(
        train_files + test_files, np.concatenate([train_labels, test_labels]), strict=True
    ):
        names.setdefault(int(c), _dog_class_name(f.split("/")[0]))
    n_classes = max(names) + 1 if names else 0
    classes = [names.get(i, f"class {i}") for i in range(n_classes)]
    train = [
        Record(os.path.join(image_root, f), int(c))
        for f, c in zip(train_files, train_labels, strict=True)
    ]
    test = [
        Record(os.path.join(image_root, f), int(c))
        for f, c in zip(test_files, test_labels, strict=True)
    ]
    return _finish(
        "dogs",
        root,
        classes,
        train,
        test,
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=image_root,
    )


BENCHMARKS: dict[str, Callable[..., Annotations]] = {
    "cub": load_cub,
    "aircraft": load_aircraft,
    "cars": load_cars,
    "dogs": load_dogs,
}


def load_benchmark(name: str, root: str | Path, **options: object) -> Annotations:
    """Parse and validate a benchmark's annotation files under ``root``."""
    return BENCHMARKS[name](Path(root).expanduser(), **options)
