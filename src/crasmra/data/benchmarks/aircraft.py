"""FGVC-Aircraft in its official layout, at one of its three levels."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from crasmra.data.base import Annotations, Record
from crasmra.data.benchmarks.common import (
    disjoint,
    few,
    find_base,
    finish,
    floats,
    keyed,
    layout_error,
    read_text,
    require_files,
)
from crasmra.data.errors import DatasetRootError

__all__ = [
    "AIRCRAFT_CLASS_COUNTS",
    "AIRCRAFT_LEVELS",
    "load_aircraft",
]


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
    base = find_base(root, ["fgvc-aircraft-2013b/data", "data", ""], "variants.txt")
    if base is None:
        raise layout_error("aircraft", root, ["fgvc-aircraft-2013b/data/variants.txt"])
    names_file = f"{AIRCRAFT_LEVELS[level]}.txt"
    lists = ["trainval", "test"] + (["train", "val"] if official_val else [])
    require_files("aircraft", root, base, [names_file, *(f"images_{level}_{s}.txt" for s in lists)])
    classes = [line.strip() for line in read_text(base / names_file).splitlines()]
    classes = [c for c in classes if c]
    repeated = sorted(c for c, n in Counter(classes).items() if n > 1)
    if repeated:
        raise DatasetRootError(
            f"aircraft: {base / names_file} lists {few(repeated)} more than once; each class "
            "must have one line: re-extract the archive"
        )
    index_of = {c: i for i, c in enumerate(classes)}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if (base / "images_box.txt").is_file():
        for k, (x1, y1, x2, y2) in keyed(
            "aircraft", base / "images_box.txt", floats(4), "4 numbers x1 y1 x2 y2"
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
        labels = keyed("aircraft", list_file(split), class_index, f"a {level} in {names_file}")
        return {
            img_id: Record(os.path.join(image_dir, f"{img_id}.jpg"), c, boxes.get(img_id))
            for img_id, c in labels.items()
        }

    parsed = {s: read(s) for s in lists}
    for a, b in [("trainval", "test")] + ([("train", "val")] if official_val else []):
        disjoint("aircraft", list_file(a), parsed[a], list_file(b), parsed[b])
    return finish(
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
