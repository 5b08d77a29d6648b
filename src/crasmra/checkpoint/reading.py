"""Reading checkpoint and weights files safely, and writing safetensors exports.

Files are read with ``torch.load(weights_only=True)`` or from safetensors, never by unpickling
arbitrary objects; every failure becomes a :class:`~crasmra.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crasmra.checkpoint.archive import one_line, verify_zip_integrity, weights_only_reason
from crasmra.checkpoint.format import NET_PREFIX, SMRAM_PREFIX, CheckpointError
from crasmra.checkpoint.metadata import validate_metadata
from crasmra.file_kinds import SAFETENSORS_META_KEY, is_safetensors, not_a_checkpoint, read_head
from crasmra.files import plain_permissions

__all__ = [
    "load_checkpoint_file",
    "network_state_dict",
    "read_network_state",
    "save_safetensors",
    "smram_state_dict",
]


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt``/``.pth`` file with ``weights_only=True``, or a safetensors file.

    The file's first bytes are looked at before anything else, so that a text file, a Git LFS
    pointer, a web page saved by a failed download or an image is named as such; zip archives
    are checked for bombs and checksums (:func:`verify_zip_integrity`); the format is told by
    content, not by suffix. A crasmra checkpoint's metadata is validated
    (:func:`validate_metadata`) before it is returned.

    Returns:
        For torch files, the stored dictionary. For safetensors, ``{"state_dict": tensors}`` plus
        ``"crasmra"`` metadata when the file carries it.

    Raises:
        FileNotFoundError: The path does not exist.
        CheckpointError: The file is truncated, corrupt, not a checkpoint, has damaged or absurd
            metadata, or would need arbitrary code execution to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Pass the path of a .ckpt written "
                                "by `crasmra fit`/`crasmra demo`, or a .safetensors export.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write was interrupted. Use the "
                              "previous checkpoint (e.g. checkpoints/last.ckpt or best.ckpt).")
    # What the first bytes say comes first: torch.load reads anything that is not a zip as a
    # legacy pickle and fails on text with a KeyError or an "unsupported operand" refusal.
    verdict = not_a_checkpoint(path)
    if verdict is not None:
        what, remedy, _ = verdict
        raise CheckpointError(f"{path} is {what}, not a checkpoint. {remedy}")
    if is_safetensors(read_head(path)):
        obj = _load_safetensors(path)
    else:
        verify_zip_integrity(path)
        obj = _torch_load(path)
    validate_metadata(obj, path)
    return obj


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol it may not support just before it refuses
            # the file; the refusal below says what matters in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses "
            f"({weights_only_reason(err)}). crasmra never unpickles arbitrary objects, since that "
            "can run code. Re-save the weights as a plain state dict or as safetensors."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError, TypeError, AttributeError, struct.error) as err:
        # The last five come from a damaged legacy (non-zip) file deep inside the unpickler.
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({type(err).__name__}: "
            f"{one_line(err)}). "
            "Use an earlier checkpoint; crasmra writes checkpoints atomically, so the previous "
            "one in the same folder is intact."
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} does not hold a dictionary of tensors (found {type(obj).__name__})."
        )
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
    if SAFETENSORS_META_KEY in metadata:
        try:
            result["crasmra"] = json.loads(metadata[SAFETENSORS_META_KEY])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} has damaged crasmra metadata ({err}).") from err
        except RecursionError:
            raise CheckpointError(f"{path} has damaged crasmra metadata: it is nested too "
                                  "deeply to read (a crafted file).") from None
    return result



def read_network_state(path: str | Path) -> tuple[dict[str, Tensor], int | None]:
    """The inference network's state dict from a checkpoint or weights file.

    Accepts a training checkpoint (keys under ``net.``), a safetensors export, or a plain
    state dict of the network.

    Returns:
        The state dict with network-relative keys, and the number of classes when recorded.
    """
    ckpt = load_checkpoint_file(path)
    state = network_state_dict(ckpt, path)
    meta = ckpt.get("crasmra")
    num_classes = None
    if isinstance(meta, dict) and isinstance(meta.get("net_config"), dict):
        num_classes = meta["net_config"].get("num_classes")
    return state, num_classes


def _tensor_state(ckpt: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no tensor state dict ('state_dict' entry or top level).")
    return state


def network_state_dict(ckpt: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """The inference network's tensors of a loaded checkpoint, with network-relative keys.

    A training checkpoint's ``net.*`` entries are kept (prefix removed) and everything else,
    SMRAM included, is dropped; a state dict without ``net.`` keys is returned as it is.

    Raises:
        CheckpointError: There is no state dict of tensors.
    """
    state = _tensor_state(ckpt, path)
    if any(k.startswith(NET_PREFIX) for k in state):
        state = {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    return state


def smram_state_dict(ckpt: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """SMRAM's tensors of a loaded training checkpoint, with SMRAM-relative keys.

    Raises:
        CheckpointError: The checkpoint holds no SMRAM weights (a variant trained without
            SMRAM, or an export, which never carries them).
    """
    state = _tensor_state(ckpt, path)
    smram = {k[len(SMRAM_PREFIX):]: v for k, v in state.items() if k.startswith(SMRAM_PREFIX)}
    if not smram:
        raise CheckpointError(
            f"{path} holds no SMRAM weights: only training checkpoints of the 'cra-smra' variant "
            "have them (exports and other variants never do)."
        )
    return smram


def save_safetensors(path: str | Path, state: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors and the ``"crasmra"`` metadata entry as a safetensors file.

    :func:`load_checkpoint_file` reads the file back as ``{"state_dict": ..., "crasmra": meta}``.

    Args:
        path: Output file (conventionally ``*.safetensors``).
        state: Tensors to store; they are made contiguous and copied to the CPU.
        meta: JSON-serialisable metadata (tuples become lists).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={SAFETENSORS_META_KEY: json.dumps(meta)})
    plain_permissions(path)
    return path
