"""What a data module reads: its class list when it is built, one split's dataset at setup.

The annotations of a file-based set are parsed once, in the constructor (so that a wrong
root fails before any training starts), and every split is then cut from that one parse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from crasmra.data.base import Annotations, FGVCImageDataset
from crasmra.data.errors import DatasetRootError
from crasmra.data.factory import build_split, create_dataset, dataset_classes, load_annotations

__all__ = ["make_split", "read_classes"]


def read_classes(
    dataset: str, root: str | None, options: dict[str, Any], skip_bad_images: bool
) -> tuple[Annotations | None, list[str]]:
    """The parsed annotations (None for "synthetic", which has no files) and the class names.

    Raises:
        DatasetRootError: ``root`` is missing or malformed, or holds a single class.
    """
    if dataset == "synthetic":
        return None, dataset_classes("synthetic", None, **options)
    loader_options = {k: v for k, v in options.items() if k != "bbox_crop"}
    annotations = load_annotations(
        dataset, root, skip_bad_images=skip_bad_images, **loader_options
    )
    classes = list(annotations.classes)
    if len(classes) < 2:
        # Caught here, where the data is named; otherwise torchmetrics refuses
        # num_classes=1 when the model is built, in its own words. (Not in the
        # readers: one class is fine for create_dataset, e.g. to evaluate a subset.)
        raise DatasetRootError(
            f"{dataset}: {root} has one class ({classes[0]!r}); a "
            "classifier needs at least 2 classes: add images of the other classes"
        )
    return annotations, classes


def make_split(
    annotations: Annotations | None,
    split: str,
    transform: Callable,
    *,
    options: dict[str, Any],
    val_fraction: float,
    split_seed: int,
    skip_bad_images: bool,
    train_per_class: int | None,
    subset_seed: int,
    decode_backend: str,
) -> Dataset:
    """One split of the data read by :func:`read_classes`: the synthetic set when
    ``annotations`` is None, else the records of ``split`` cut from the parsed annotations."""
    if annotations is None:
        return create_dataset(
            "synthetic",
            None,
            split,
            transform=transform,
            val_fraction=val_fraction,
            split_seed=split_seed,
            **options,
        )
    dataset = build_split(
        annotations,
        split,
        transform,
        val_fraction=val_fraction,
        split_seed=split_seed,
        bbox_crop=bool(options.get("bbox_crop", False)),
        skip_bad_images=skip_bad_images,
        train_per_class=train_per_class,
        subset_seed=subset_seed,
    )
    # The synthetic set renders PIL images, which the tensor transforms convert; file
    # sets decode straight to tensors.
    if isinstance(dataset, FGVCImageDataset):
        dataset.decode_backend = decode_backend
    return dataset
