"""The checks of :class:`~crasmra.data.FGVCDataModule`'s arguments.

They run in the data module's constructor, before any annotation file is read, so that a
mistyped value fails at once and in the words of the option to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crasmra.data.base import check_train_per_class
from crasmra.data.factory import SYNTHETIC_SUBSET_ERROR, check_options, dataset_names
from crasmra.data.transforms import (
    BACKENDS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    Size,
    default_resize_size,
    normalization_for_backbone,
    to_hw,
)

__all__ = ["check_arguments", "image_sizes", "normalization"]


def check_arguments(
    dataset: str,
    root: str | None,
    options: dict[str, Any],
    *,
    batch_size: object,
    num_workers: object,
    val_fraction: float,
    prefetch_factor: object,
    decode_backend: str,
    normalize_on_device: bool,
    train_per_class: object,
    subset_seed: object,
) -> None:
    """Refuse the data module's arguments that no dataset or loader could use.

    Raises:
        ValueError: The first argument found wrong, named as its ``--data.*`` flag is.
    """
    if dataset not in dataset_names():
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(dataset_names())}"
        )
    check_options(dataset, options)
    if dataset != "synthetic" and root is None:
        raise ValueError(
            f"dataset {dataset!r} needs root= (the folder its archive was extracted into)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            "num_workers must be an int >= 0 (0 loads in the main process), "
            f"got {num_workers!r}"
        )
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(
            f"val_fraction must be in [0, 1), got {val_fraction}; use 0 to disable validation"
        )
    if prefetch_factor is not None and (
        not isinstance(prefetch_factor, int) or prefetch_factor < 1
    ):
        raise ValueError(
            f"prefetch_factor must be None or an int >= 1, got {prefetch_factor!r}"
        )
    if decode_backend not in BACKENDS:
        raise ValueError(
            f"decode_backend must be one of {', '.join(map(repr, BACKENDS))}, "
            f"got {decode_backend!r}"
        )
    if normalize_on_device and decode_backend != "tensor":
        raise ValueError(
            "normalize_on_device=True needs decode_backend='tensor' (the PIL pipeline "
            "normalises in the workers); set decode_backend: tensor or turn it off"
        )
    check_train_per_class(train_per_class, subset_seed)
    if dataset == "synthetic" and train_per_class is not None:
        raise ValueError(SYNTHETIC_SUBSET_ERROR)


def image_sizes(
    image_size: Size, resize_size: Size | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``(h, w)`` crop and resize sizes; the resize defaults to the paper's 550/448.

    Raises:
        ValueError: A malformed size, or a crop larger than the resize it is cut from.
    """
    crop = to_hw(image_size, "image_size")
    resize = (
        default_resize_size(crop) if resize_size is None else to_hw(resize_size, "resize_size")
    )
    if resize[0] < crop[0] or resize[1] < crop[1]:
        raise ValueError(
            f"image_size {crop} is larger than resize_size {resize}; lower image_size or raise "
            "resize_size (the paper: 448 from 550), or leave resize_size unset"
        )
    return crop, resize


def normalization(
    backbone: str | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)``: the ones given, else ``backbone``'s pretrained ones, else ImageNet's.

    Raises:
        ValueError: A given ``mean`` or ``std`` is not 3 numbers (a ``std`` not 3 above 0).
    """
    base_mean, base_std = (
        normalization_for_backbone(backbone)
        if backbone
        else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )
    return (
        _check_stats("mean", mean, positive=False) or tuple(base_mean),
        _check_stats("std", std, positive=True) or tuple(base_std),
    )


def _check_stats(
    name: str, values: Sequence[float] | None, positive: bool
) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from err
    if len(out) != 3 or (positive and min(out) <= 0):
        raise ValueError(
            f"{name} must be 3 numbers{' > 0' if positive else ''} (one per RGB channel), "
            f"got {values!r}"
        )
    return out
