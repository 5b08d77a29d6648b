"""Annotation readers of the four FGVC benchmarks in their official layouts."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from crasmra.data.base import Annotations, Record, check_files_exist, warn_counts
from crasmra.data.errors import DatasetRootError, read_utf8

__all__ = ["BENCHMARKS", "OFFICIAL_COUNTS", "load_benchmark"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How many offending ids a message shows.
MAX_LISTED_IDS = 5

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


def _read_text(path: Path) -> str:
    """The text of an annotation file; a file that is not UTF-8 is refused naming it."""
    return read_utf8(path, "the file is damaged or not the original: re-extract it from the "
                     "archive")


def _read_rows(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, key, value)`` of lines ``key value...``; blank lines skipped."""
    out = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetRootError(
                f"{path}:{lineno}: expected 'key value', got {line!r}; fix the line or "
                "re-extract the archive"
            )
        out.append((lineno, parts[0], parts[1]))
    return out


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines ``key value...`` split on the first whitespace; blank lines skipped."""
    return [(k, v) for _, k, v in _read_rows(path)]


def _few(items: list[str]) -> str:
    """The first few of ``items`` joined, and how many more there are (for messages)."""
    more = len(items) - MAX_LISTED_IDS
    return ", ".join(items[:MAX_LISTED_IDS]) + (f" and {more} more" if more > 0 else "")


def _keyed(name: str, path: Path, parse: Callable[[str], T], expected: str) -> dict[str, T]:
    """``{key: parse(value)}`` of a ``key value`` file; bad values and repeated keys refused.

    A ``dict`` of the lines would silently keep only the last of two lines with one id.
    """
    out: dict[str, T] = {}
    first_line: dict[str, int] = {}
    repeated: list[str] = []
    for lineno, key, value in _read_rows(path):
        try:
            parsed = parse(value)
        except ValueError as err:
            raise DatasetRootError(
                f"{name}: {path}:{lineno}: expected {expected} after id {key}, got {value!r}; "
                "fix the line or re-extract the archive"
            ) from err
        if key in out:
            repeated.append(f"{key} (lines {first_line[key]}, {lineno})")
            continue
        out[key] = parsed
        first_line[key] = lineno
    if repeated:
        raise DatasetRootError(
            f"{name}: {path} lists {len(repeated)} id(s) more than once: {_few(repeated)}; each "
            "id must have one line: remove the extra lines or re-extract the archive"
        )
    return out


def _same_ids(name: str, ref: Path, ref_ids: dict, other: Path, other_ids: dict) -> None:
    """Refuse two annotation files whose image ids differ, naming both files and the ids."""
    missing = [k for k in ref_ids if k not in other_ids]
    extra = [k for k in other_ids if k not in ref_ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} id(s) of {ref.name} have no line in {other.name}: {_few(missing)}"
            )
        if extra:
            parts.append(f"{len(extra)} id(s) of {other.name} are not in {ref.name}: {_few(extra)}")
        raise DatasetRootError(
            f"{name}: the image ids of {ref} and {other} differ: {'; '.join(parts)}. The files "
            "must come from one release: re-extract them from the same archive"
        )


def _disjoint(name: str, a: Path, a_ids: dict, b: Path, b_ids: dict) -> None:
    """Refuse two split lists that share image ids, naming both files and the ids."""
    both = [k for k in a_ids if k in b_ids]
    if both:
        raise DatasetRootError(
            f"{name}: {len(both)} image(s) are listed in both {a} and {b}: {_few(both)}; a "
            "model would be evaluated on images it trained on: re-extract the lists from the "
            "same archive"
        )


def _split_flag(value: str) -> bool:
    """train_test_split.txt's ``1`` (train) or ``0`` (test)."""
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


def _floats(n: int) -> Callable[[str], tuple[float, ...]]:
    """A parser of ``n`` whitespace-separated numbers."""

    def parse(value: str) -> tuple[float, ...]:
        out = tuple(float(t) for t in value.split())
        if len(out) != n:
            raise ValueError(value)
        return out

    return parse


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
    warn_counts(name, [
        ("classes", len(classes), official_classes or official["classes"]),
        ("training images", len(train), official["train"]),
        ("test images", len(test), official["test"]),
    ])
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
    images = _keyed("cub", base / "images.txt", str, "an image path")
    labels = _keyed("cub", base / "image_class_labels.txt", int, "an integer class id")
    is_train = _keyed("cub", base / "train_test_split.txt", _split_flag, "1 (train) or 0 (test)")
    _same_ids("cub", base / "images.txt", images, base / "image_class_labels.txt", labels)
    _same_ids("cub", base / "images.txt", images, base / "train_test_split.txt", is_train)
    class_rows = _keyed("cub", base / "classes.txt", str, "a class folder name")
    for lineno, k, _ in _read_rows(base / "classes.txt"):
        if not k.isdigit():
            raise DatasetRootError(
                f"cub: {base / 'classes.txt'}:{lineno}: expected an integer class id first, "
                f"got {k!r}; fix the line or re-extract the archive"
            )
    class_ids = sorted((int(k), v) for k, v in class_rows.items())
    classes = [_cub_class_name(v) for _, v in class_ids]
    index_of = {cid: i for i, (cid, _) in enumerate(class_ids)}
    unknown = sorted({c for c in labels.values() if c not in index_of})
    if unknown:
        first_image: dict[int, str] = {}
        for k, v in labels.items():
            first_image.setdefault(v, k)
        examples = [f"{c} (image {first_image[c]})" for c in unknown]
        raise DatasetRootError(
            f"cub: {base / 'image_class_labels.txt'} uses {len(unknown)} class id(s) that "
            f"{base / 'classes.txt'} does not list: {_few(examples)}; the files must come from "
            "one release: re-extract them from the same archive"
        )
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if (base / "bounding_boxes.txt").is_file():
        for k, (x, y, w, h) in _keyed(
            "cub", base / "bounding_boxes.txt", _floats(4), "4 numbers x y width height"
        ).items():
            boxes[k] = (x, y, x + w, y + h)
    train: list[Record] = []
    test: list[Record] = []
    image_dir = str(base / "images")
    for img_id, rel in images.items():
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
    classes = [line.strip() for line in _read_text(base / names_file).splitlines()]
    classes = [c for c in classes if c]
    repeated = sorted(c for c, n in Counter(classes).items() if n > 1)
    if repeated:
        raise DatasetRootError(
            f"aircraft: {base / names_file} lists {_few(repeated)} more than once; each class "
            "must have one line: re-extract the archive"
        )
    index_of = {c: i for i, c in enumerate(classes)}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if (base / "images_box.txt").is_file():
        for k, (x1, y1, x2, y2) in _keyed(
            "aircraft", base / "images_box.txt", _floats(4), "4 numbers x1 y1 x2 y2"
        ).items():
            boxes[k] = (x1 - 1, y1 - 1, x2, y2)

    image_dir = str(base / "images")

    def class_index(cls: str) -> int:
        if cls not in index_of:
            raise ValueError(cls)
        return index_of[cls]

    def list_file(split: str) -> Path:
        return base / f"images_{level}_{split}.txt"

    def read(split: str) -> dict[str, Record]:
        labels = _keyed("aircraft", list_file(split), class_index, f"a {level} in {names_file}")
        return {
            img_id: Record(os.path.join(image_dir, f"{img_id}.jpg"), c, boxes.get(img_id))
            for img_id, c in labels.items()
        }

    parsed = {s: read(s) for s in lists}
    for a, b in [("trainval", "test")] + ([("train", "val")] if official_val else []):
        _disjoint("aircraft", list_file(a), parsed[a], list_file(b), parsed[b])
    return _finish(
        "aircraft",
        root,
        classes,
        list(parsed["trainval"].values()),
        list(parsed["test"].values()),
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=base / "images",
        val=list(parsed["val"].values()) if official_val else None,
        official_val_train=list(parsed["train"].values()) if official_val else None,
        official_classes=AIRCRAFT_CLASS_COUNTS[level],
    )


# --------------------------------------------------------------------------- Stanford Cars


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises several unrelated types for a bad .mat
        raise DatasetRootError(f"cannot read {path}: {err} (re-download it?)") from err


def _field(data: object, key: str, path: Path) -> np.ndarray:
    """``data[key]`` of a loaded .mat file (a dict or a struct array), at least 1-d."""
    try:
        return np.atleast_1d(data[key])  # type: ignore[index]
    except (KeyError, ValueError, IndexError) as err:
        raise DatasetRootError(
            f"{path} has no field {key!r}; it is not the original file: download it again"
        ) from err


def _check_list(
    name: str, path: Path, files: list[str], labels: np.ndarray, n_classes: int | None
) -> None:
    """Refuse a .mat list with unequal lengths, repeated files or class ids out of range.

    Ids are 1-based in the files; ``labels`` are 0-based. ``n_classes=None`` checks >= 1 only.
    """
    if len(files) != len(labels):
        raise DatasetRootError(
            f"{name}: {path} lists {len(files)} images but {len(labels)} class ids; it is "
            "damaged or not the original: download it again"
        )
    high = n_classes if n_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((labels < 0) | (labels >= high))
    if bad.size:
        shown = [f"{int(labels[i]) + 1} ({files[i]})" for i in bad]
        limit = f"1..{n_classes}" if n_classes is not None else ">= 1"
        raise DatasetRootError(
            f"{name}: {path} has {bad.size} class id(s) outside {limit}: {_few(shown)}; the "
            "annotation files must come from one release: download them again"
        )
    repeated = sorted(f for f, n in Counter(files).items() if n > 1)
    if repeated:
        raise DatasetRootError(
            f"{name}: {path} lists {len(repeated)} image(s) more than once: {_few(repeated)}; "
            "it is damaged or not the original: download it again"
        )


def _str_list(values: object) -> list[str]:
    return [str(v).strip() for v in np.atleast_1d(values)]


def _cars_boxes(ann: np.ndarray, path: Path) -> list[tuple[float, float, float, float]]:
    cols = [
        _field(ann, f, path).astype(np.float64)
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
        meta = base / "devkit/cars_meta.mat"
        classes = _str_list(_field(_loadmat(meta), "class_names", meta))

        def image_dir(split: str) -> Path:
            # Kaggle's re-upload nests cars_train/cars_train/.
            nested = base / split / split
            return nested if nested.is_dir() else base / split

        def read(mat: Path, folder: Path) -> list[Record]:
            ann = _field(_loadmat(mat), "annotations", mat)
            labels = _field(ann, "class", mat).astype(np.int64) - 1
            names = _str_list(_field(ann, "fname", mat))
            _check_list("cars", mat, names, labels, len(classes))
            return [
                Record(os.path.join(folder, f), int(c), b)
                for f, c, b in zip(names, labels, _cars_boxes(ann, mat), strict=True)
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
    annos = base / "cars_annos.mat"
    mat = _loadmat(annos)
    classes = _str_list(_field(mat, "class_names", annos))
    ann = _field(mat, "annotations", annos)
    labels = _field(ann, "class", annos).astype(np.int64) - 1
    is_test = _field(ann, "test", annos).astype(bool)
    paths = _str_list(_field(ann, "relative_im_path", annos))
    _check_list("cars", annos, paths, labels, len(classes))
    train, test = [], []
    for p, c, t, b in zip(paths, labels, is_test, _cars_boxes(ann, annos), strict=True):
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
        path = base / name
        mat = _loadmat(path)
        files = _str_list(_field(mat, "file_list", path))
        labels = _field(mat, "labels", path).astype(np.int64) - 1
        # The lists define the classes, so only ids below 1 are impossible.
        _check_list("dogs", path, files, labels, None)
        return files, labels

    train_files, train_labels = read("train_list.mat")
    test_files, test_labels = read("test_list.mat")
    _disjoint(
        "dogs",
        base / "train_list.mat",
        dict.fromkeys(train_files),
        base / "test_list.mat",
        dict.fromkeys(test_files),
    )
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
