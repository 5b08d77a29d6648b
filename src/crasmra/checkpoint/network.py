"""A checkpoint's contents checked against the network its metadata describes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from crasmra.checkpoint.format import CheckpointError
from crasmra.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Preprocessing

if TYPE_CHECKING:
    from crasmra.model import Network

__all__ = ["check_network_state", "read_classes", "read_preprocessing"]

log = logging.getLogger(__name__)


def read_classes(meta: dict[str, Any], num_classes: int, path: str | Path) -> list[str]:
    """The class names of a checkpoint's metadata, for a network of ``num_classes`` classes.

    Raises:
        CheckpointError: The names are damaged or their number differs from the network's.
    """
    classes = meta.get("classes")
    if classes is None:
        log.warning("%s records no class names; using class_0..class_%d", path, num_classes - 1)
        return [f"class_{i}" for i in range(num_classes)]
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path} has damaged metadata: 'classes' is not a list of names.")
    if len(classes) != num_classes:
        raise CheckpointError(
            f"{path} is inconsistent: its network has {num_classes} classes but it lists "
            f"{len(classes)} class names. The file was edited or assembled from two runs; use "
            "the checkpoint as `crasmra fit` wrote it."
        )
    return list(classes)


def read_preprocessing(meta: dict[str, Any], path: str | Path) -> Preprocessing:
    """The eval preprocessing a checkpoint's metadata records, tried once.

    Raises:
        CheckpointError: The recorded transform is damaged or unusable.
    """
    config = meta.get("transform")
    if config is None:
        # Checkpoints written without a data module (e.g. a bare LightningModule) record only
        # timm's preprocessing config; fall back to the paper's resize/crop ratio at its size.
        data_config = meta.get("data_config") or {}
        size = list(data_config.get("input_size", (3, 448, 448)))[1:]
        config = {
            "image_size": size,
            "resize_size": None,
            "mean": list(data_config.get("mean", IMAGENET_DEFAULT_MEAN)),
            "std": list(data_config.get("std", IMAGENET_DEFAULT_STD)),
        }
        log.warning("%s records no eval transform; using resize + centre crop to %s", path, size)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has damaged metadata: 'transform' is not a dictionary.")
    try:
        preprocessing = Preprocessing.from_config(config)
        preprocessing.transform()  # a malformed config fails here, not at the first image
        return preprocessing
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has an unusable eval transform {config}: {err}") from err


def check_network_state(net: Network, state: dict[str, Tensor], path: str | Path) -> None:
    """Refuse weights that do not fit the network the metadata describes, or are not finite.

    Raises:
        CheckpointError: Missing, unexpected or wrongly shaped weights, or NaN/Inf values.
    """
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the network its metadata describes "
            f"({net.config['backbone']}, variant={net.variant}): {len(missing)} missing "
            f"weights (first: {missing[:3]}), {len(unexpected)} unexpected (first: "
            f"{unexpected[:3]}). The file was altered, or written by an incompatible crasmra."
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        # The final layer of one head: its first dimension is the number of classes.
        last = list(net.classifier_layers().values())[-1].weight
        head_key = next(name for name, p in net.named_parameters() if p is last)
        if head_key in state and state[head_key].shape[0] != net.num_classes:
            raise CheckpointError(
                f"{path} holds classifier weights for {state[head_key].shape[0]} classes but its "
                f"metadata says {net.num_classes}; the file was altered. Use the checkpoint as "
                "`crasmra fit` wrote it."
            )
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{path} has {len(wrong)} weight(s) of the wrong shape (first: {key} is {got}, the "
            f"network needs {want}); the file was altered or does not belong to this metadata."
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path} has non-finite values (NaN/Inf) in {len(bad)} weight(s) (first: {bad[0]}). "
            "Training diverged before this checkpoint was saved, or the file is damaged; use an "
            "earlier checkpoint."
        )
