"""CUB-200-2011 in its official layout."""

from __future__ import annotations

import os
import re
from pathlib import Path

from crasmra.data.base import Annotations, Record
from crasmra.data.benchmarks.common import (
    few,
    find_base,
    finish,
    floats,
    keyed,
    layout_error,
    read_rows,
    require_files,
    same_ids,
    split_flag,
)
from crasmra.data.errors import DatasetRootError

__all__ = [
    "load_cub",
]


def _cub_class_name(folder: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return re.sub(r"^\d+\.", "", folder).replace("_", " ").strip()


def load_cub(root: Path, *, skip_bad_images: bool = False, check_files: bool = True) -> Annotations:
    """CUB-200-2011: 200 bird species, 5994 train / 5794 test; boxes as x, y, w, h."""
    base = find_base(root, ["CUB_200_2011", ""], "images.txt")
    if base is None:
        raise layout_error("cub", root, ["CUB_200_2011/images.txt"])
    require_files(
        "cub",
        root,
        base,
        ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"],
    )
    images = keyed("cub", base / "images.txt", str, "an image path")
    labels = keyed("cub", base / "image_class_labels.txt", int, "an integer class id")
    is_train = keyed("cub", base / "train_test_split.txt", split_flag, "1 (train) or 0 (test)")
    same_ids("cub", base / "images.txt", images, base / "image_class_labels.txt", labels)
    same_ids("cub", base / "images.txt", images, base / "train_test_split.txt", is_train)
    class_rows = keyed("cub", base / "classes.txt", str, "a class folder name")
    for lineno, k, _ in read_rows(base / "classes.txt"):
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
            f"{base / 'classes.txt'} does not list: {few(examples)}; the files must come from "
            "one release: re-extract them from the same archive"
        )
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if (base / "bounding_boxes.txt").is_file():
        for k, (x, y, w, h) in keyed(
            "cub", base / "bounding_boxes.txt", floats(4), "4 numbers x y width height"
        ).items():
            boxes[k] = (x, y, x + w, y + h)
    train: list[Record] = []
    test: list[Record] = []
    image_dir = str(base / "images")
    for img_id, rel in images.items():
        rec = Record(os.path.join(image_dir, rel), index_of[labels[img_id]], boxes.get(img_id))
        (train if is_train[img_id] else test).append(rec)
    return finish(
        "cub",
        root,
        classes,
        train,
        test,
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=base / "images",
    )
