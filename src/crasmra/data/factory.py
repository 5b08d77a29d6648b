"""``create_dataset``: one entry point for every dataset name, and the registry of datasets.

A file-based dataset is one annotation reader and one registration::

    def load_birds(root: Path, *, skip_bad_images: bool = False, level: str = "species"):
        ...  # parse the files under root
        return Annotations("birds", root, classes, train, test)

    register_dataset("birds", load_birds, options={"level"})

after which ``--data.dataset birds --data.options '{level: genus}'`` trains on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from crasmra.data.base import (
    SPLITS,
    Annotations,
    FGVCImageDataset,
    Record,
    check_train_per_class,
    select_split,
)
from crasmra.data.benchmarks import BENCHMARKS
from crasmra.data.errors import DatasetRootError
from crasmra.data.generic import CSV_LAYOUT, class_folders, images_under, load_csv, load_folder
from crasmra.data.synthetic import SyntheticFGVC
from crasmra.data.transforms import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    build_transforms,
)

__all__ = [
    "DATASET_NAMES",
    "create_dataset",
    "create_labelled_test_folder",
    "dataset_classes",
    "dataset_names",
    "load_annotations",
    "register_dataset",
]

#: The built-in datasets; :func:`dataset_names` adds the registered ones.
DATASET_NAMES = ("cub", "aircraft", "cars", "dogs", "folder", "csv", "synthetic")


@dataclass(frozen=True)
class _Dataset:
    reader: Callable[..., Annotations]
    options: frozenset[str]
    bbox: bool


_DATASETS: dict[str, _Dataset] = {}


def register_dataset(
    name: str,
    reader: Callable[..., Annotations],
    *,
    options: Iterable[str] = (),
    bbox: bool = False,
) -> None:
    """Make a file-based dataset available under ``name``.

    Args:
        name: The name for ``--data.dataset``.
        reader: ``reader(root: Path, *, skip_bad_images: bool, **options) -> Annotations``;
            it parses and checks the annotation files under ``root``.
        options: The keyword options the reader takes (``--data.options``).
        bbox: The annotations carry bounding boxes (``bbox_crop`` is then available).

    Raises:
        ValueError: ``name`` is taken.
    """
    if name in _DATASETS or name == "synthetic":
        raise ValueError(f"Dataset {name!r} is already registered.")
    _DATASETS[name] = _Dataset(reader, frozenset(options), bbox)


def dataset_names() -> tuple[str, ...]:
    """Every dataset name ``create_dataset`` takes: the built-in ones, then registered ones."""
    return (*DATASET_NAMES, *(n for n in _DATASETS if n not in DATASET_NAMES))

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
SYNTHETIC_NATIVE_SIZE = 128
SYNTHETIC_SUBSET_ERROR = (
    "train_per_class is for file-based datasets; the synthetic set generates its training "
    "images: use --data.options '{samples_per_class: N}' instead"
)


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown dataset name or an option it does not take."""
    if name not in dataset_names():
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}"
        )
    allowed = SYNTHETIC_OPTIONS if name == "synthetic" else _DATASETS[name].options | {"bbox_crop"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        # The usual cause: a config written for another dataset (the demo's synthetic
        # options) with only --data.dataset changed on the command line.
        raise ValueError(
            f"dataset {name!r} does not take option(s) {unknown}; it takes: "
            f"{', '.join(sorted(allowed)) or 'none'}. Options set by a config for another "
            "dataset are cleared with --data.options '{}'"
        )
    if options.get("bbox_crop") and (name == "synthetic" or not _DATASETS[name].bbox):
        with_boxes = sorted(n for n, d in _DATASETS.items() if d.bbox)
        raise ValueError(f"bbox_crop is available for {', '.join(with_boxes)}, not {name!r}")


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
    return _DATASETS[name].reader(Path(root).expanduser(), skip_bad_images=skip_bad_images,
                                  **options)


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
    train_per_class: int | None = None,
    subset_seed: int = 0,
) -> FGVCImageDataset:
    """The :class:`FGVCImageDataset` of one split of parsed annotations.

    ``train_per_class``/``subset_seed`` keep a seeded few-shot subset of the "train" split
    (see :func:`~crasmra.data.base.select_split`); other splits ignore them.
    """
    if split == "test" and not ann.test:
        raise DatasetRootError(
            f"{ann.name}: no test set found for {ann.root}"
            + (f"\n{CSV_LAYOUT}" if ann.name == "csv" else "")
        )
    records = select_split(
        ann,
        split,
        val_fraction,
        split_seed,
        train_per_class=train_per_class,
        subset_seed=subset_seed,
    )
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
    train_per_class: int | None = None,
    subset_seed: int = 0,
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
        train_per_class: Keep this many seeded photos per class of the "train" split,
            drawn after val was carved out (nested across sizes for one ``subset_seed``);
            None keeps them all. Other splits ignore it. File-based sets only: for
            "synthetic" set ``samples_per_class`` instead.
        subset_seed: Seed of the ``train_per_class`` subset.
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
    check_train_per_class(train_per_class, subset_seed)
    if name == "synthetic" and train_per_class is not None:
        raise ValueError(SYNTHETIC_SUBSET_ERROR)
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
        train_per_class=train_per_class,
        subset_seed=subset_seed,
    )


# The built-in file-based datasets, registered as any other would be.
register_dataset("cub", BENCHMARKS["cub"], options={"check_files"}, bbox=True)
register_dataset("aircraft", BENCHMARKS["aircraft"],
                 options={"level", "official_val", "check_files"}, bbox=True)
register_dataset("cars", BENCHMARKS["cars"], options={"check_files"}, bbox=True)
register_dataset("dogs", BENCHMARKS["dogs"], options={"check_files"})
register_dataset("folder", load_folder)
register_dataset("csv", load_csv, options={"test_csv", "check_files"})


def create_labelled_test_folder(
    root: str | os.PathLike[str], classes: Sequence[str], transform: Callable
) -> FGVCImageDataset:
    """The test split of a ``folder`` dataset that has ``test/`` but no ``train/``, labelled
    by ``classes`` (e.g. a checkpoint's) in place of the class folders of ``train/``.

    Args:
        root: The dataset root, holding ``test/<class>/...``.
        classes: Class names in label order; every class folder must be one of them.
        transform: The transform of every image.

    Raises:
        DatasetRootError: A class folder is not in ``classes``, or there are no images.
    """
    test = Path(root).expanduser() / "test"
    index_of = {name: i for i, name in enumerate(classes)}
    folders = [Path(entry.path) for entry in class_folders(test)]
    unknown = [p.name for p in folders if p.name not in index_of]
    if unknown:
        raise DatasetRootError(
            f"folder: {test} has class folders the checkpoint does not know: "
            f"{unknown[:5]} (its classes: {list(classes)[:5]}...). Name the folders after the "
            "checkpoint's classes, or add the train/ folder it was trained on."
        )
    records = [Record(str(path), index_of[folder.name]) for folder in folders
               for path in images_under(folder)]
    if not records:
        raise DatasetRootError(f"folder: {test} holds no images in class sub-folders.")
    return FGVCImageDataset(records, list(classes), transform, name="folder/test")
