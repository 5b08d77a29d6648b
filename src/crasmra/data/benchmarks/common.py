"""What the four benchmark readers share: official counts, layouts, sources and the checks
of their annotation files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from crasmra.data.base import Annotations, Record, check_files_exist, warn_counts
from crasmra.data.errors import DatasetRootError, read_utf8

__all__ = [
    "LAYOUTS",
    "MAX_LISTED_IDS",
    "OFFICIAL_COUNTS",
    "URLS",
    "disjoint",
    "few",
    "find_base",
    "finish",
    "floats",
    "keyed",
    "layout_error",
    "read_pairs",
    "read_rows",
    "read_text",
    "require_files",
    "same_ids",
    "split_flag",
]


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


def layout_error(name: str, root: Path, missing: list[str], hint: str = "") -> DatasetRootError:
    """The error for a root without the layout of ``name``: what is missing, the expected
    layout and where the data comes from."""
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


def find_base(root: Path, candidates: list[str], marker: str) -> Path | None:
    """The first ``root/candidate`` that contains ``marker``."""
    for sub in candidates:
        base = root / sub if sub else root
        if (base / marker).is_file():
            return base
    return None


def require_files(name: str, root: Path, base: Path, files: list[str]) -> None:
    """Raise :func:`layout_error` unless every one of ``files`` exists under ``base``."""
    missing = [f for f in files if not (base / f).exists()]
    if missing:
        raise layout_error(name, root, [str(base / f) for f in missing])


def read_text(path: Path) -> str:
    """The text of an annotation file; a file that is not UTF-8 is refused naming it."""
    return read_utf8(path, "the file is damaged or not the original: re-extract it from the "
                     "archive")


def read_rows(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, key, value)`` of lines ``key value...``; blank lines skipped."""
    out = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
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


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines ``key value...`` split on the first whitespace; blank lines skipped."""
    return [(k, v) for _, k, v in read_rows(path)]


def few(items: list[str]) -> str:
    """The first few of ``items`` joined, and how many more there are (for messages)."""
    more = len(items) - MAX_LISTED_IDS
    return ", ".join(items[:MAX_LISTED_IDS]) + (f" and {more} more" if more > 0 else "")


def keyed(name: str, path: Path, parse: Callable[[str], T], expected: str) -> dict[str, T]:
    """``{key: parse(value)}`` of a ``key value`` file; bad values and repeated keys refused.

    A ``dict`` of the lines would silently keep only the last of two lines with one id.
    """
    out: dict[str, T] = {}
    first_line: dict[str, int] = {}
    repeated: list[str] = []
    for lineno, key, value in read_rows(path):
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
            f"{name}: {path} lists {len(repeated)} id(s) more than once: {few(repeated)}; each "
            "id must have one line: remove the extra lines or re-extract the archive"
        )
    return out


def same_ids(name: str, ref: Path, ref_ids: dict, other: Path, other_ids: dict) -> None:
    """Refuse two annotation files whose image ids differ, naming both files and the ids."""
    missing = [k for k in ref_ids if k not in other_ids]
    extra = [k for k in other_ids if k not in ref_ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} id(s) of {ref.name} have no line in {other.name}: {few(missing)}"
            )
        if extra:
            parts.append(f"{len(extra)} id(s) of {other.name} are not in {ref.name}: {few(extra)}")
        raise DatasetRootError(
            f"{name}: the image ids of {ref} and {other} differ: {'; '.join(parts)}. The files "
            "must come from one release: re-extract them from the same archive"
        )


def disjoint(name: str, a: Path, a_ids: dict, b: Path, b_ids: dict) -> None:
    """Refuse two split lists that share image ids, naming both files and the ids."""
    both = [k for k in a_ids if k in b_ids]
    if both:
        raise DatasetRootError(
            f"{name}: {len(both)} image(s) are listed in both {a} and {b}: {few(both)}; a "
            "model would be evaluated on images it trained on: re-extract the lists from the "
            "same archive"
        )


def split_flag(value: str) -> bool:
    """train_test_split.txt's ``1`` (train) or ``0`` (test)."""
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


def floats(n: int) -> Callable[[str], tuple[float, ...]]:
    """A parser of ``n`` whitespace-separated numbers."""

    def parse(value: str) -> tuple[float, ...]:
        out = tuple(float(t) for t in value.split())
        if len(out) != n:
            raise ValueError(value)
        return out

    return parse


def finish(
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
            raise layout_error(name, root, [f"the image folder {image_dir}"])
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
