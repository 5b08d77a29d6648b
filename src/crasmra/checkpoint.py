"""Safe reading of crasmra checkpoints and weights files.

Checkpoints are read with ``torch.load(weights_only=True)`` or from safetensors, never by
unpickling arbitrary objects, and every failure is turned into a :class:`CheckpointError`
whose message says what is wrong with the file and what to do.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: Layout version of the ``"crasmra"`` entry in checkpoints. Bumped on incompatible changes.
FORMAT_VERSION = 1
#: Prefix of the inference network's keys inside a training checkpoint's state dict.
NET_PREFIX = "net."


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used, with the reason and the remedy."""


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt``/``.pth`` file with ``weights_only=True``, or a ``.safetensors`` file.

    Returns:
        For torch files, the stored dictionary. For safetensors, ``{"state_dict": tensors}`` plus
        ``"crasmra"`` metadata when the file carries it.

    Raises:
        FileNotFoundError: The path does not exist.
        CheckpointError: The file is truncated, corrupt, not a checkpoint, or would need
            arbitrary code execution to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Pass the path of a .ckpt written "
                                "by `crasmra fit`/`crasmra demo`, or a .safetensors export.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write was interrupted. Use the "
                              "previous checkpoint (e.g. checkpoints/last.ckpt or best.ckpt).")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses ({err}). crasmra never "
            "unpickles arbitrary objects, since that can run code. Re-save the weights as a plain "
            "state dict or as safetensors."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({type(err).__name__}: {err}). "
            "Use an earlier checkpoint; crasmra writes checkpoints atomically, so the previous "
            "one in the same folder is intact."
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dictionary of tensors (found {type(obj).__name__}).")
    return obj


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be "
                              "truncated. Export it again with `crasmra export`.") from err
    result: dict[str, Any] = {"state_dict": tensors}
    if "crasmra" in metadata:
        try:
            result["crasmra"] = json.loads(metadata["crasmra"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} has damaged crasmra metadata ({err}).") from err
    return result


def checkpoint_metadata(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``"crasmra"`` entry of a loaded checkpoint, validated.

    Raises:
        CheckpointError: The file was not written by crasmra or by an incompatible version.
    """
    meta = ckpt.get("crasmra")
    if not isinstance(meta, dict) or "net_config" not in meta:
        raise CheckpointError(
            f"{path} was not written by crasmra (it has no 'crasmra' entry describing the "
            "network). Pass a checkpoint from `crasmra fit` or `crasmra demo`; to start from "
            "plain backbone weights use --model.pretrained PATH instead."
        )
    version = meta.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this crasmra understands "
            f"({FORMAT_VERSION}); upgrade crasmra (written by crasmra {meta.get('version', '?')})."
        )
    return meta


def read_network_state(path: str | Path) -> tuple[dict[str, Tensor], int | None]:
    """The inference network's state dict from a checkpoint or weights file.

    Accepts a training checkpoint (keys under ``net.``), a safetensors export, or a plain
    state dict of the network.

    Returns:
        The state dict with network-relative keys, and the number of classes when recorded.
    """
    ckpt = load_checkpoint_file(path)
    state = ckpt.get("state_dict", ckpt)
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no tensor state dict ('state_dict' entry or top level).")
    if any(k.startswith(NET_PREFIX) for k in state):
        state = {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    meta = ckpt.get("crasmra")
    num_classes = None
    if isinstance(meta, dict):
        num_classes = meta.get("net_config", {}).get("num_classes")
    return state, num_classes
