"""Helpers for the data tests: benchmark trees from the real annotation fixtures.

The annotation files are the real ones (../shared/fixtures/fgvc-annotations relative to
the repository); images are one tiny JPEG hard-linked (or copied) to every listed path.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "fgvc-annotations"


def fixtures_dir() -> Path:
    """The annotation fixture folder, or skip the test when it is not checked out."""
    if not (FIXTURES / "SOURCES.md").is_file():
        pytest.skip(f"annotation fixtures not found at {FIXTURES}")
    return FIXTURES


def jpeg_bytes(size: tuple[int, int] = (8, 8), color=(120, 60, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def place_images(base: Path, rel_paths: Iterable[str], size: tuple[int, int] = (8, 8)) -> int:
    """Write one tiny JPEG and hard-link it to every path under ``base`` (copy if links fail)."""
    template = base / ".placeholder.jpg"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_bytes(jpeg_bytes(size))
    made_dirs: set[Path] = set()
    n = 0
    for rel in rel_paths:
        dst = base / rel
        if dst.parent not in made_dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(dst.parent)
        if dst.exists():
            continue
        try:
            os.link(template, dst)
        except OSError:
            shutil.copyfile(template, dst)
        n += 1
    return n


def copy_annotations(src: Path, dst: Path) -> None:
    """Copy an annotation tree (the fixtures are read-only; copies are writable)."""
    shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=shutil.copyfile)


def build_cub(root: Path, images: bool = True) -> Path:
    """``root/CUB_200_2011/...`` with the real lists; returns ``root``."""
    copy_annotations(fixtures_dir() / "cub", root)
    if images:
        lines = (root / "CUB_200_2011/images.txt").read_text().split()
        place_images(root / "CUB_200_2011/images", lines[1::2])
    return root


def build_aircraft(root: Path, images: bool = True) -> Path:
    copy_annotations(fixtures_dir() / "aircraft", root)
    data = root / "fgvc-aircraft-2013b/data"
    if images:
        ids = [
            line.split()[0] for line in (data / "images_box.txt").read_text().splitlines() if line
        ]
        place_images(data / "images", (f"{i}.jpg" for i in ids))
    return root


def _loadmat(path: Path) -> dict:
    import scipy.io

    return scipy.io.loadmat(str(path), squeeze_me=True)


def build_cars_devkit(root: Path, images: bool = True) -> Path:
    copy_annotations(fixtures_dir() / "cars", root)
    if images:
        train = _loadmat(root / "devkit/cars_train_annos.mat")["annotations"]["fname"]
        test = _loadmat(root / "cars_test_annos_withlabels.mat")["annotations"]["fname"]
        place_images(root / "cars_train", (str(f) for f in train))
        place_images(root / "cars_test", (str(f) for f in test))
    return root


def build_cars_full(root: Path, images: bool = True) -> Path:
    """The full-archive layout (cars_annos.mat + car_ims/), built from the devkit data.

    The fixtures hold only the devkit files; cars_annos.mat is rebuilt with the field names
    of the official file (relative_im_path, bbox_*, class, test) and a class_names row.
    """
    import scipy.io

    src = fixtures_dir() / "cars"
    meta = scipy.io.loadmat(str(src / "devkit/cars_meta.mat"))
    train = _loadmat(src / "devkit/cars_train_annos.mat")["annotations"]
    test = _loadmat(src / "cars_test_annos_withlabels.mat")["annotations"]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    for is_test, ann in ((0, train), (1, test)):
        for a in ann:
            rows.append(
                (f"car_ims/{len(rows) + 1:06d}.jpg", *(int(a[f]) for f in fields[1:6]), is_test)
            )
    arr = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows):
        arr[0, i] = tuple(np.array([[v]]) if not isinstance(v, str) else np.array([v]) for v in r)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        str(root / "cars_annos.mat"), {"annotations": arr, "class_names": meta["class_names"]}
    )
    if images:
        place_images(root, (r[0] for r in rows))
    return root


def build_dogs(root: Path, images: bool = True, lists_dir: str = "") -> Path:
    src = fixtures_dir() / "dogs"
    dst = root / lists_dir if lists_dir else root
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("train_list.mat", "test_list.mat", "file_list.mat"):
        shutil.copyfile(src / name, dst / name)
    if images:
        files = _loadmat(src / "file_list.mat")["file_list"]
        place_images(root / "Images", (str(f) for f in files))
    return root
