"""Stanford Dogs in its official layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from crasmra.data.base import Annotations, Record
from crasmra.data.benchmarks.common import disjoint, find_base, finish, layout_error, require_files
from crasmra.data.benchmarks.mat import check_mat_list, loadmat, mat_field, str_list

__all__ = [
    "load_dogs",
]


def _dog_class_name(folder: str) -> str:
    """``n02085782-Japanese_spaniel`` -> ``Japanese spaniel``."""
    return folder.split("-", 1)[-1].replace("_", " ").strip()


def load_dogs(
    root: Path, *, skip_bad_images: bool = False, check_files: bool = True
) -> Annotations:
    """Stanford Dogs: 120 breeds, 12000 train / 8580 test, lists at root or under lists/."""
    base = find_base(root, ["", "lists"], "train_list.mat")
    if base is None:
        tar_hint = (
            "Found lists.tar: extract it (tar xf lists.tar) next to Images/."
            if (root / "lists.tar").is_file()
            else ""
        )
        raise layout_error("dogs", root, ["train_list.mat (or lists/train_list.mat)"], tar_hint)
    require_files("dogs", root, base, ["test_list.mat"])
    image_root = root / "Images"

    def read(name: str) -> tuple[list[str], np.ndarray]:
        path = base / name
        mat = loadmat(path)
        files = str_list(mat_field(mat, "file_list", path))
        labels = mat_field(mat, "labels", path).astype(np.int64) - 1
        # The lists define the classes, so only ids below 1 are impossible.
        check_mat_list("dogs", path, files, labels, None)
        return files, labels

    train_files, train_labels = read("train_list.mat")
    test_files, test_labels = read("test_list.mat")
    disjoint(
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
    return finish(
        "dogs",
        root,
        classes,
        train,
        test,
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=image_root,
    )
