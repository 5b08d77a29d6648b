"""Stanford Cars in its devkit or full-archive layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from crasmra.data.base import Annotations, Record
from crasmra.data.benchmarks.common import find_base, finish, layout_error, require_files
from crasmra.data.benchmarks.mat import check_mat_list, loadmat, mat_field, str_list

__all__ = [
    "load_cars",
]



def _cars_boxes(ann: np.ndarray, path: Path) -> list[tuple[float, float, float, float]]:
    cols = [
        mat_field(ann, f, path).astype(np.float64)
        for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
    ]
    return [(x1 - 1, y1 - 1, x2, y2) for x1, y1, x2, y2 in zip(*cols, strict=True)]


def load_cars(
    root: Path, *, skip_bad_images: bool = False, check_files: bool = True
) -> Annotations:
    """Stanford Cars, devkit layout or full-archive (cars_annos.mat + car_ims/) layout."""
    base = find_base(root, ["", "stanford_cars"], "devkit/cars_meta.mat")
    if base is not None:
        label_file = find_base(base, ["", "devkit"], "cars_test_annos_withlabels.mat")
        require_files("cars", root, base, ["devkit/cars_train_annos.mat"])
        if label_file is None:
            raise layout_error(
                "cars",
                root,
                [str(base / "cars_test_annos_withlabels.mat")],
                hint="The devkit's cars_test_annos.mat has no labels; the labelled test "
                "annotations were released separately as cars_test_annos_withlabels.mat.",
            )
        meta = base / "devkit/cars_meta.mat"
        classes = str_list(mat_field(loadmat(meta), "class_names", meta))

        def image_dir(split: str) -> Path:
            # Kaggle's re-upload nests cars_train/cars_train/.
            nested = base / split / split
            return nested if nested.is_dir() else base / split

        def read(mat: Path, folder: Path) -> list[Record]:
            ann = mat_field(loadmat(mat), "annotations", mat)
            labels = mat_field(ann, "class", mat).astype(np.int64) - 1
            names = str_list(mat_field(ann, "fname", mat))
            check_mat_list("cars", mat, names, labels, len(classes))
            return [
                Record(os.path.join(folder, f), int(c), b)
                for f, c, b in zip(names, labels, _cars_boxes(ann, mat), strict=True)
            ]

        train_dir, test_dir = image_dir("cars_train"), image_dir("cars_test")
        train = read(base / "devkit/cars_train_annos.mat", train_dir)
        test = read(label_file / "cars_test_annos_withlabels.mat", test_dir)
        if check_files and not test_dir.is_dir():
            raise layout_error("cars", root, [f"the image folder {test_dir}"])
        return finish(
            "cars",
            root,
            classes,
            train,
            test,
            skip_bad_images=skip_bad_images,
            check_files=check_files,
            image_dir=train_dir,
        )
    base = find_base(root, ["", "stanford_cars"], "cars_annos.mat")
    if base is None:
        raise layout_error(
            "cars", root, ["devkit/cars_meta.mat (devkit layout) or cars_annos.mat (full archive)"]
        )
    annos = base / "cars_annos.mat"
    mat = loadmat(annos)
    classes = str_list(mat_field(mat, "class_names", annos))
    ann = mat_field(mat, "annotations", annos)
    labels = mat_field(ann, "class", annos).astype(np.int64) - 1
    is_test = mat_field(ann, "test", annos).astype(bool)
    paths = str_list(mat_field(ann, "relative_im_path", annos))
    check_mat_list("cars", annos, paths, labels, len(classes))
    train, test = [], []
    for p, c, t, b in zip(paths, labels, is_test, _cars_boxes(ann, annos), strict=True):
        (test if t else train).append(Record(os.path.join(base, p), int(c), b))
    return finish(
        "cars",
        root,
        classes,
        train,
        test,
        skip_bad_images=skip_bad_images,
        check_files=check_files,
        image_dir=base / "car_ims",
    )
