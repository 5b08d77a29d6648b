"""``create_dataset``: one entry point for every dataset name."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from crasmra.data.base import SPLITS, Annotations, FGVCImageDataset, select_split
from crasmra.data.benchmarks import load_benchmark
from crasmra.data.errors import DatasetRootError
from crasmra.data.generic import CSV_LAYOUT, load_csv, load_folder
from crasmra.data.synthetic import SyntheticFGVC
from crasmra.data.transforms import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    build_transforms,
)

__all__ = ["DATASET_NAMES", "create_dataset", "dataset_classes", "load_annotations"]

DATASET_NAMES = ("cub", "aircraft", "cars", "dogs", "folder", "csv", "synthetic")

# Options each dataset's annotation reader understands (besides skip_bad_images).
LOADER_OPTIONS: dict[str, frozenset[str]] = {
    "cub": frozenset({"check_files"}),
    "aircraft": frozenset({"level", "official_val", "check_files"}),
    "cars": frozenset({"check_files"}),
    "dogs": frozenset({"check_files"}),
    "folder": frozenset(),
    "csv": frozenset({"test_csv", "check_files"}),
}
SYNTHETIC_OPTIONS = frozenset(
    {
        "num_classes",
        "samples_per_class",
        "test_samples_per_class",
        "native_size",
        "seed",
        "max_rotation",
        "clutter",
    }
)
BBOX_DATASETS = frozenset({"cub", "aircraft", "cars"})
SYNTHETIC_NATIVE_SIZE = 128


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown dataset name or an option it does not take."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    allowed = SYNTHETIC_OPTIONS if name == "synthetic" else LOADER_OPTIONS[name] | {"bbox_crop"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"dataset {name!r} does not take option(s) {unknown}; it takes: "
            f"{', '.join(sorted(allowed)) or 'none'}"
        )
    if options.get("bbox_crop") and name not in BBOX_DATASETS:
        raise ValueError(
            f"bbox_crop is available for {', '.join(sorted(BBOX_DATASETS))}, not {name!r}"
        )


def load_annotations(
    name: str, root: str | os.PathLike[str] | None, *, skip_bad_images: bool = False, **options: Any
) -> Annotations:
    """Parse and validate the annotations of a file-based dataset (not "synthetic").

    Raises:
        DatasetRootError: ``root`` is missing, has the wrong layout, or lacks listed images.
    """
    options = {k: v for k, v in options.items() if k != "bbox_crop"}
    check_options(name, options)
    if name == "synthetic":
        raise ValueError("the synthetic set has no annotation files")
    if root is None:
        raise ValueError(
            f"dataset {name!r} needs root= (the folder its archive was extracted into)"
        )
    path = Path(root).expanduser()
    if name == "folder":
        return load_folder(path, skip_bad_images=skip_bad_images)
    if name == "csv":
        return load_csv(path, skip_bad_images=skip_bad_images, **options)
    return load_benchmark(name, path, skip_bad_images=skip_bad_images, **options)


def dataset_classes(
    name: str, root: str | os.PathLike[str] | None = None, **options: Any
) -> list[str]:
    """Class names of a dataset in label order (validates the root of file-based sets)."""
    if name == "synthetic":
        check_options(name, options)
        return _synthetic(split="test", transform=None, **options).classes
    skip = bool(options.pop("skip_bad_images", False))
    return load_annotations(name, root, skip_bad_images=skip, **options).classes


def _synthetic(split: str, transform: Callable | None, **options: Any) -> SyntheticFGVC:
    opts = dict(options)
    native = opts.pop("native_size", SYNTHETIC_NATIVE_SIZE)
    return SyntheticFGVC(split, image_size=native, transform=transform, **opts)


def build_split(
    ann: Annotations,
    split: str,
    transform: Callable | None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    bbox_crop: bool = False,
    skip_bad_images: bool = False,
) -> FGVCImageDataset:
    """The :class:`FGVCImageDataset` of one split of parsed annotations."""
    if split == "test" and not ann.test:
        raise DatasetRootError(
            f"{ann.name}: no test set found for {ann.root}"
            + (f"\n{CSV_LAYOUT}" if ann.name == "csv" else "")
        )
    records = select_split(ann, split, val_fraction, split_seed)
    return FGVCImageDataset(
        records,
        ann.classes,
        transform,
        bbox_crop=bbox_crop,
        skip_bad_images=skip_bad_images,
        name=f"{ann.name}/{split}",
    )


def create_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    transform: Callable | None = None,
    image_size: int | Sequence[int] | None = None,
    resize_size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    random_crop: bool = False,
    hflip: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    skip_bad_images: bool = False,
    **options: Any,
) -> Dataset:
    """Create one split of a dataset; items are ``(image tensor (3, H, W), label)``.

    Args:
        name: "cub", "aircraft", "cars", "dogs", "folder", "csv" or "synthetic".
        root: The folder the archive was extracted into (or its inner folder); for "csv"
            the CSV file; ignored for "synthetic".
        split: "train" or "val" (a seeded stratified split of the official training set)
            or "test" (the official test set).
        transform: Replaces the default transform (see :func:`build_transforms`).
        image_size: Crop size of the default transform; default 448, and for "synthetic"
            the generated size (``native_size``, default 128).
        resize_size: Resize before the crop; default 550/448 of ``image_size``.
        mean, std, random_crop, hflip: Passed to :func:`build_transforms`.
        val_fraction: Share of the official training set held out as val (0 disables val).
        split_seed: Seed of the train/val split.
        skip_bad_images: Skip unreadable or missing images with one warning per file
            instead of raising.
        **options: Dataset-specific: ``bbox_crop`` (cub, aircraft, cars), ``level``
            ("variant"/"family"/"manufacturer") and ``official_val`` (aircraft),
            ``test_csv`` (csv), ``check_files`` (file sets: stat every listed image,
            default True); synthetic: ``num_classes``, ``samples_per_class``,
            ``test_samples_per_class``, ``native_size``, ``seed``, ``max_rotation``, ``clutter``.

    Returns:
        A dataset with ``classes`` and ``targets`` (and ``samples`` for file-based sets).

    Raises:
        DatasetRootError: The root is missing, has the wrong layout or lacks images.
        ValueError: An unknown name, split or option, or invalid sizes.
    """
    check_options(name, options)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is None:
        image_size = (
            options.get("native_size", SYNTHETIC_NATIVE_SIZE)
            if name == "synthetic"
            else DEFAULT_IMAGE_SIZE
        )
    if transform is None:
        transform = build_transforms(
            split == "train",
            image_size=image_size,
            resize_size=resize_size,
            mean=mean,
            std=std,
            random_crop=random_crop,
            hflip=hflip,
        )
    if name == "synthetic":
        return _synthetic(
            split, transform, val_fraction=val_fraction, split_seed=split_seed, **options
        )
    bbox_crop = bool(options.pop("bbox_crop", False))
    ann = load_annotations(name, root, skip_bad_images=skip_bad_images, **options)
    return build_split(
        ann,
        split,
        transform,
        val_fraction=val_fraction,
        split_seed=split_seed,
        bbox_crop=bbox_crop,
        skip_bad_images=skip_bad_images,
    )
