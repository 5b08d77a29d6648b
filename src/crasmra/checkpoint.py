"""Safe reading of crasmra checkpoints and weights files.

Checkpoints are read with ``torch.load(weights_only=True)`` or from safetensors, never by
unpickling arbitrary objects, and every failure is turned into a :class:`CheckpointError`
whose message says what is wrong with the file and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from crasmra.errors import CrasmraError

log = logging.getLogger(__name__)

#: Layout version of the ``"crasmra"`` entry in checkpoints. Bumped on incompatible changes.
FORMAT_VERSION = 1
#: Prefix of the inference network's keys inside a training checkpoint's state dict.
NET_PREFIX = "net."
#: Prefix of SMRAM's (training-only) keys inside a training checkpoint's state dict.
SMRAM_PREFIX = "smram."
#: Key of the JSON-encoded ``"crasmra"`` entry in a safetensors file's metadata.
SAFETENSORS_META_KEY = "crasmra"


class CheckpointError(CrasmraError, ValueError):
    """A checkpoint or weights file that cannot be used, with the reason and the remedy."""


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt``/``.pth`` file with ``weights_only=True``, or a safetensors file.

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
    verify_zip_integrity(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses "
            f"({weights_only_reason(err)}). crasmra never unpickles arbitrary objects, since that "
            "can run code. Re-save the weights as a plain state dict or as safetensors."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({type(err).__name__}: "
            f"{_one_line(err)}). "
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
    state = network_state_dict(ckpt, path)
    meta = ckpt.get("crasmra")
    num_classes = None
    if isinstance(meta, dict):
        num_classes = meta.get("net_config", {}).get("num_classes")
    return state, num_classes


# ---------------------------------------------------------------------------------------------
# Integrity checks and atomic writes
# ---------------------------------------------------------------------------------------------
#: First bytes of a zip archive, the container of every torch.save file since PyTorch 1.6.
_ZIP_MAGIC = b"PK\x03\x04"
#: Suffix of the temporary file a checkpoint is written to before it is renamed into place.
TMP_SUFFIX = ".tmp"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def weights_only_reason(err: BaseException) -> str:
    """The informative line of a ``torch.load(weights_only=True)`` refusal.

    PyTorch wraps the reason (e.g. ``Trying to load unsupported GLOBAL posix.system``) in
    several lines of advice to retry with ``weights_only=False``, which is exactly what must
    not be done with an untrusted file; only the reason is kept.
    """
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(boilerplate)]
    return (informative or lines or [type(err).__name__])[-1]


def verify_zip_integrity(path: str | Path) -> None:
    """Check every CRC-32 of a torch zip-format file.

    ``torch.load`` does not verify the checksums its zip container stores, so a checkpoint
    with flipped bytes inside a tensor loads silently with wrong weights. Reading the archive
    once with :mod:`zipfile` catches that, and a truncated archive (no central directory).
    Files in PyTorch's legacy (pre-1.6, non-zip) format carry no checksum and are skipped.

    Raises:
        CheckpointError: The file is a damaged or truncated zip archive.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {_one_line(err)}). Use an "
            "earlier checkpoint; crasmra writes checkpoints atomically, so the previous one in "
            "the same folder is intact."
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"{path} is corrupt: the checksum of its entry {bad!r} does not match (the file was "
            "modified or damaged after it was written). Use an earlier checkpoint or copy it again."
        )


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable: without it a power cut can roll the directory entry back.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) do not support fsync on a directory
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    # A process killed during a write leaves its temporary file behind; the next write of the
    # same checkpoint owns the name, so anything matching it is garbage.
    for stale in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        try:
            stale.unlink()
        except OSError as err:
            log.warning("Could not remove the stale temporary file %s: %s", stale, err)


def _plain_permissions(path: str | Path) -> None:
    # mkstemp and safetensors create files private (0600); give them what a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it always holds the old or the new content.

    The data goes to a temporary file in the same folder, is flushed to disk (``fsync``) and
    then renamed over ``path`` (``os.replace``, atomic on POSIX and Windows). A crash or
    ``kill -9`` at any moment leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _plain_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


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
    _plain_permissions(path)
    return path


def build_metadata(
    net_config: dict[str, Any],
    classes: list[str] | None,
    transform: dict[str, Any] | None,
    data_config: dict[str, Any],
) -> dict[str, Any]:
    """The ``"crasmra"`` entry describing a network, in plain JSON-ready types.

    Args:
        net_config: ``CRASMRANet.config`` (rebuilds the architecture).
        classes: Class names in label order.
        transform: Keyword arguments of ``build_transforms(train=False, ...)``.
        data_config: The backbone's timm preprocessing config.
    """
    return {
        "format_version": FORMAT_VERSION,
        "version": _package_version(),
        "net_config": dict(net_config),
        "classes": list(classes) if classes is not None else None,
        "transform": dict(transform) if transform is not None else None,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }


def _package_version() -> str:
    from crasmra._version import __version__

    return __version__
