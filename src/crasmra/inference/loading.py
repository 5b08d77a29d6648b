"""Rebuild the inference network, and SMRAM for training maps, from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crasmra._version import __version__
from crasmra.checkpoint import (
    CheckpointError,
    check_network_state,
    checkpoint_metadata,
    load_checkpoint_file,
    network_state_dict,
    read_classes,
    read_preprocessing,
    smram_state_dict,
)
from crasmra.inference.device import cpu_compute_plan, resolve_device
from crasmra.layers import SMRAM
from crasmra.model import Network, build_network, create_smram

__all__ = ["load_model", "load_smram"]


def load_model(
    path: str | Path,
    *,
    device: str | torch.device | None = "cpu",
    num_classes: int | None = None,
) -> Network:
    """Rebuild the inference network of a crasmra checkpoint, in eval mode.

    Accepts a training checkpoint from ``crasmra fit``/``crasmra demo`` (``.ckpt``) or a
    safetensors export from ``crasmra export``. SMRAM is training-only and never loaded.

    The returned object is the bare :class:`~crasmra.model.Network` (so ``model(x).probs``
    and ``model(x).stage_logits`` work as in training) with its inference attributes set:

    - ``classes``: class names in label order.
    - ``preprocessing``: a :class:`~crasmra.data.Preprocessing` (sizes, mean, std).
    - ``transform``: its eval transform, PIL RGB image -> normalised ``(3, H, W)`` tensor.
    - ``checkpoint_path``: the file it was loaded from.

    Args:
        path: Checkpoint or ``.safetensors`` file.
        device: Where to put the network (``"auto"``: a GPU if there is one).
        num_classes: When given, the number of classes the caller expects (e.g. a dataset's);
            a checkpoint for another number is refused with a clear message.

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file is truncated, corrupt, tampered with, not from crasmra, from
            an incompatible crasmra, or for another number of classes than ``num_classes``.
        ValueError: ``device`` is unknown or not available here.
    """
    device = resolve_device(device)
    ckpt = load_checkpoint_file(path)  # also checks the metadata's types and sizes
    meta = checkpoint_metadata(ckpt, path)
    net_config = {**meta["net_config"], "pretrained": False}
    # The network is first built on the meta device (no memory) and compared with the stored
    # weights: metadata describing a far larger network than the file holds is refused before
    # anything is allocated for it.
    skeleton = _build_network(net_config, meta, path, torch.device("meta"))
    if num_classes is not None and num_classes != skeleton.num_classes:
        raise CheckpointError(
            f"{path} was trained for {skeleton.num_classes} classes, but {num_classes} are "
            "expected here (e.g. by the dataset). Use a checkpoint trained on this data, or "
            "fine-tune this one with `crasmra fit --model.runtime.init_from CKPT "
            "--model.runtime.reinit_heads true`."
        )
    classes = read_classes(meta, skeleton.num_classes, path)
    preprocessing = read_preprocessing(meta, path)
    state = network_state_dict(ckpt, path)
    check_network_state(skeleton, state, path)
    net = _build_network(net_config, meta, path, torch.device("cpu"))
    net.load_state_dict(state)
    net.eval()
    net.to(device)
    plan = cpu_compute_plan(net)
    if plan is not None and plan.channels_last:
        net.to(memory_format=torch.channels_last)
    net.set_inference_info(classes, preprocessing, checkpoint_path=str(path))
    return net


def _build_network(
    net_config: dict[str, Any], meta: dict[str, Any], path: str | Path, device: torch.device
) -> Network:
    try:
        with device:
            return build_network(**net_config)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path} describes a network this crasmra ({__version__}) cannot build ({err}); it "
            f"was written by crasmra {meta.get('version', '?')}. Install that version, or "
            "retrain."
        ) from err


def load_smram(path: str | Path, model: Network) -> SMRAM:
    """SMRAM with the weights of a ``cra-smra`` training checkpoint, in eval mode.

    For ``crasmra cam --train-maps``: SMRAM is not part of the inference network, so its
    weights exist only in training checkpoints.

    Raises:
        CheckpointError: The file has no SMRAM weights or they do not fit ``model``.
    """
    ckpt = load_checkpoint_file(path)
    state = smram_state_dict(ckpt, path)
    smram = create_smram(model)
    try:
        smram.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its SMRAM weights do not fit the network ({err}).") from err
    device = next(model.parameters()).device
    return smram.to(device).eval()
