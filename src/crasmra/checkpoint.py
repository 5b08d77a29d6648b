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
import struct
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crasmra.errors import CrasmraError, UsageError
from crasmra.files import plain_permissions

log = logging.getLogger(__name__)

#: Layout version of the ``"crasmra"`` entry in checkpoints. Bumped on incompatible changes.
FORMAT_VERSION = 1
#: Prefix of the inference network's keys inside a training checkpoint's state dict.
NET_PREFIX = "net."
#: Prefix of SMRAM's (training-only) keys inside a training checkpoint's state dict.
SMRAM_PREFIX = "smram."
#: Key of the JSON-encoded ``"crasmra"`` entry in a safetensors file's metadata.
SAFETENSORS_META_KEY = "crasmra"
#: Name of the extra file holding the ``"crasmra"`` metadata in a TorchScript export.
TORCHSCRIPT_META = "crasmra.json"
#: Suffixes of checkpoint and weights files: no crasmra command writes over such a file.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
#: Limits on the numbers a checkpoint's metadata may hold. Far above any real model (the paper
#: uses 512-wide heads, 448 px crops and at most 200 classes), they stop a damaged or hostile
#: file from making crasmra allocate terabytes before anything else could notice.
MAX_CLASSES = 100_000
MAX_HEAD_WIDTH = 16_384
MAX_IMAGE_SIDE = 4_096
#: The uncompressed size a torch zip archive may declare: torch stores its entries
#: uncompressed, so a real checkpoint declares about its own size. More means a zip bomb.
MAX_ZIP_EXPANSION = 2
ZIP_SLACK_BYTES = 16 * 2**20


class CheckpointError(CrasmraError, ValueError):
    """A checkpoint or weights file that cannot be used, with the reason and the remedy."""


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
    verdict = _not_a_checkpoint(path)
    if verdict is not None:
        what, remedy, _ = verdict
        raise CheckpointError(f"{path} is {what}, not a checkpoint. {remedy}")
    if _is_safetensors(_head(path)):
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
        except RecursionError:
            raise CheckpointError(f"{path} has damaged crasmra metadata: it is nested too "
                                  "deeply to read (a crafted file).") from None
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
    validate_metadata(ckpt, path)
    if not isinstance(meta["net_config"], dict):
        raise _damaged(path, "'net_config' is not a dictionary")
    return meta


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return "(a value nested too deeply to show)"
    return text if len(text) <= 60 else text[:57] + "..."


def _damaged(path: str | Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} has damaged metadata: {what}. The file was altered or damaged; use the "
        "checkpoint as `crasmra fit` wrote it (or an earlier one)."
    )


def _check_int(value: Any, name: str, high: int, path: str | Path) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise _damaged(path, f"{name} is {_short(value)}, expected an integer in 1..{high}")


def _check_size(value: Any, name: str, path: str | Path) -> None:
    sides = list(value) if isinstance(value, list | tuple) else [value]
    if len(sides) not in (1, 2):
        raise _damaged(path, f"{name} is {_short(value)}, expected a size or [height, width]")
    for side in sides:
        _check_int(side, name, MAX_IMAGE_SIDE, path)


def _check_network_numbers(config: dict[str, Any], where: str, path: str | Path) -> None:
    if "num_classes" in config:
        _check_int(config["num_classes"], f"{where}.num_classes", MAX_CLASSES, path)
    for key in ("head_channels", "head_hidden", "reduction"):
        if key in config:
            _check_int(config[key], f"{where}.{key}", MAX_HEAD_WIDTH, path)
    for key in ("backbone", "variant"):
        if key in config and not isinstance(config[key], str):
            raise _damaged(path, f"{where}.{key} is {_short(config[key])}, expected a name")


def _check_transform(config: Any, where: str, path: str | Path) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise _damaged(path, f"'{where}' is {type(config).__name__}, expected a dictionary")
    for key in ("image_size", "resize_size"):
        if config.get(key) is not None:
            _check_size(config[key], f"{where}.{key}", path)
    _check_normalization(config, where, path)


def _check_normalization(config: dict[str, Any], where: str, path: str | Path) -> None:
    # A NaN, an infinite or an absurd mean or std would make every prediction NaN (predict
    # printing "nan%") or meaningless while the run exits 0.
    from crasmra.data.transforms import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        check_normalization,
    )

    if config.get("mean") is None and config.get("std") is None:
        return
    try:
        check_normalization(config.get("mean", IMAGENET_DEFAULT_MEAN),
                            config.get("std", IMAGENET_DEFAULT_STD))
    except ValueError as err:
        raise _damaged(path, f"{where}: {err}") from None


#: Data settings that select a checkpoint's evaluation images and their transform, the ones
#: an evaluation takes from the checkpoint (``crasmra test``/``validate`` without data
#: options, ``report``, ``serve``'s examples). Loading settings (batch size, workers) are not
#: taken from a file: they are the command's own.
STORED_DATA_KEYS = ("dataset", "root", "val_fraction", "split_seed", "options", "image_size",
                    "resize_size", "mean", "std", "decode_backend", "normalize_on_device",
                    "skip_bad_images", "train_per_class", "subset_seed")


def check_data_settings(settings: Any, path: str | Path) -> dict[str, Any]:
    """The data settings stored with a checkpoint (or in its run folder's ``config.yaml``),
    checked as the command line checks the same values.

    Types, ranges and finiteness are checked for every key of :data:`STORED_DATA_KEYS` (the
    others are dropped); the synthetic set's options with
    :func:`crasmra.data.synthetic.check_synthetic_options`, sizes within ``MAX_IMAGE_SIDE``,
    the normalisation with :func:`crasmra.data.transforms.check_normalization`. So a file
    cannot make an evaluation allocate without bound, hang or fail in a loader worker.

    Returns:
        The checked settings, with only the keys of :data:`STORED_DATA_KEYS`.

    Raises:
        CheckpointError: A setting has the wrong type or an absurd value.
    """
    from crasmra.data import dataset_names
    from crasmra.data.synthetic import check_synthetic_options

    if not isinstance(settings, dict):
        raise _damaged(path, f"its data settings are {type(settings).__name__}, not a "
                             "dictionary")
    out = {k: settings[k] for k in STORED_DATA_KEYS if k in settings}
    where = "data settings"
    dataset = out.get("dataset")
    if not isinstance(dataset, str) or dataset not in dataset_names():
        raise _damaged(path, f"{where}: dataset is {_short(dataset)}, expected one of "
                             f"{', '.join(dataset_names())}")
    root = out.get("root")
    if root is not None and (not isinstance(root, str) or len(root) > 4096 or "\0" in root):
        raise _damaged(path, f"{where}: root is {_short(root)}, expected a path")
    fraction = out.get("val_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                 or not 0 <= fraction < 1):
        raise _damaged(path, f"{where}: val_fraction is {_short(fraction)}, expected a number "
                             "in [0, 1)")
    for key in ("split_seed", "subset_seed"):
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < 2**63):
            raise _damaged(path, f"{where}: {key} is {_short(value)}, expected an integer >= 0")
    per_class = out.get("train_per_class")
    if per_class is not None:
        _check_int(per_class, f"{where}.train_per_class", 10**9, path)
    for key in ("normalize_on_device", "skip_bad_images"):
        if key in out and not isinstance(out[key], bool):
            raise _damaged(path, f"{where}: {key} is {_short(out[key])}, expected true or false")
    if "decode_backend" in out and not isinstance(out["decode_backend"], str):
        raise _damaged(path, f"{where}: decode_backend is {_short(out['decode_backend'])}")
    _check_transform({k: out[k] for k in ("image_size", "resize_size", "mean", "std")
                      if out.get(k) is not None}, where, path)
    options = out.get("options")
    if options is not None:
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise _damaged(path, f"{where}: options is {_short(options)}, expected a mapping of "
                                 "option names to values")
        if dataset == "synthetic":
            try:
                check_synthetic_options(options)
            except ValueError as err:
                raise _damaged(path, f"{where}: {str(err).split('; change')[0]}") from None
    return out


def validate_metadata(ckpt: dict[str, Any], path: str | Path) -> None:
    """Check the types and ranges of a crasmra checkpoint's metadata before anything is built.

    Every number that sizes a network or an image (classes, head widths, crop and resize
    sizes) must be an integer within generous limits, so that a damaged or hostile file is
    refused with a message instead of ending in an allocator error or a traceback. Files
    without a ``"crasmra"`` entry (plain weights) are left alone.

    Raises:
        CheckpointError: A value has the wrong type or an absurd size, or the format is newer
            than this crasmra.
    """
    if "crasmra" not in ckpt:
        return
    meta = ckpt["crasmra"]
    if not isinstance(meta, dict):
        raise _damaged(path, f"its 'crasmra' entry is {type(meta).__name__}, not a dictionary")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(path, f"format_version is {_short(version)}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this crasmra understands "
            f"({FORMAT_VERSION}); upgrade crasmra (written by crasmra "
            f"{_short(meta.get('version', '?'))})."
        )
    net_config = meta.get("net_config")
    if net_config is not None:
        if not isinstance(net_config, dict):
            raise _damaged(path, "'net_config' is not a dictionary")
        _check_network_numbers(net_config, "net_config", path)
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list | tuple)
                                or len(classes) > MAX_CLASSES
                                or not all(isinstance(c, str) for c in classes)):
        raise _damaged(path, "'classes' is not a list of names")
    _check_transform(meta.get("transform"), "transform", path)
    data_config = meta.get("data_config")
    if data_config is not None:
        if not isinstance(data_config, dict):
            raise _damaged(path, "'data_config' is not a dictionary")
        size = data_config.get("input_size")
        if size is not None:
            if not isinstance(size, list | tuple) or len(size) != 3:
                raise _damaged(path, f"data_config.input_size is {_short(size)}, expected "
                                     "[channels, height, width]")
            _check_size(list(size)[1:], "data_config.input_size", path)
    # Lightning rebuilds the training module from these (--ckpt_path), before any weights load.
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, dict):
        _check_network_numbers(hparams, "hyper_parameters", path)
        _check_transform(hparams.get("transform_config"), "hyper_parameters.transform_config",
                         path)


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


# ---------------------------------------------------------------------------------------------
# Integrity checks and atomic writes
# ---------------------------------------------------------------------------------------------
#: First bytes of a zip archive, the container of every torch.save file since PyTorch 1.6.
_ZIP_MAGIC = b"PK\x03\x04"


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
    Before any entry is read, the archive must look like a torch checkpoint and must not
    declare far more data than the file holds (a zip bomb).

    Raises:
        CheckpointError: The file is a damaged or truncated zip archive, a zip bomb, or a zip
            archive that is no torch checkpoint.
    """
    path = Path(path)
    try:
        if not _head(path).startswith(_ZIP_MAGIC):
            return
        with zipfile.ZipFile(path) as archive:
            _check_archive(archive, path)
            bad = archive.testzip()
    except CheckpointError:
        raise
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


def _check_archive(archive: zipfile.ZipFile, path: Path) -> None:
    """Refuse a zip that is no torch checkpoint, or a zip bomb, before any entry is read.

    ``testzip`` and ``torch.load`` both inflate every entry to the size its header declares:
    a 3 MB archive declaring 3 GiB would take a minute and gigabytes of memory to refuse.
    """
    infos = archive.infolist()
    declared = sum(info.file_size for info in infos)
    limit = MAX_ZIP_EXPANSION * path.stat().st_size + ZIP_SLACK_BYTES
    if declared > limit:
        raise CheckpointError(
            f"{path} is not a usable checkpoint: its zip entries declare "
            f"{declared / 2**20:,.0f} MiB uncompressed in a {path.stat().st_size / 2**20:,.1f} MiB "
            "file (torch stores checkpoints uncompressed, so this is a damaged file or a zip "
            "bomb). It was not unpacked; use a checkpoint written by `crasmra fit`."
        )
    names = [info.filename for info in infos]
    if any(name.endswith("/constants.pkl") for name in names):
        raise CheckpointError(
            f"{path} is a TorchScript model (e.g. from `crasmra export --format torchscript`), "
            "not a checkpoint: load it with torch.jit.load. crasmra commands need the .ckpt "
            "written by `crasmra fit` or a .safetensors export."
        )
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise CheckpointError(
            f"{path} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl; first "
            f"entries: {names[:3]}). Pass a .ckpt written by `crasmra fit`/`crasmra demo`, or "
            "a .safetensors export."
        )


# ---------------------------------------------------------------------------------------------
# What a file is
# ---------------------------------------------------------------------------------------------
#: First bytes of a Git LFS pointer: the small text file a repository holds in place of a large
#: file until ``git lfs pull`` downloads it.
_LFS_MAGIC = b"version https://git-lfs"
#: The magic number that starts every legacy (pre-1.6) torch.save file, after the pickle header.
_LEGACY_TORCH_MAGIC = b"\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_IMAGE_MAGICS = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}
_CHECKPOINT_HINT = ("Pass a .ckpt written by `crasmra fit`/`crasmra demo`, or a .safetensors "
                    "export from `crasmra export`.")


def _head(path: Path, size: int = 1024) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def _is_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header itself.
    if len(head) < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= 100 * 2**20 and head[8:9] == b"{"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # The sample may end inside a multi-byte character.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)


def _not_a_checkpoint(path: Path) -> tuple[str, str, bool] | None:
    """``(what the file is, what to do, probably a misplaced argument)`` when its first bytes
    show it is no checkpoint; None when it may be one (a zip archive, a legacy torch file or a
    safetensors file, checked further when read)."""
    head = _head(path)
    if head.startswith(_ZIP_MAGIC) or head.startswith(b"\x80") or _is_safetensors(head):
        return None
    if head.startswith(_LFS_MAGIC):
        return ("a Git LFS pointer (a small text file that stands for the real file)",
                "Run `git lfs pull` in its repository to download the checkpoint itself.", False)
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(b"<") and any(tag in start for tag in (b"<html", b"<!doctype html",
                                                                 b"<head", b"<body")):
        return ("a web page (HTML)",
                "The download probably failed (a login, error or redirect page was saved "
                "instead); download the checkpoint again.", False)
    for magic, what in _IMAGE_MAGICS.items():
        if head.startswith(magic):
            return what, _CHECKPOINT_HINT, True
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image", _CHECKPOINT_HINT, True
    if path.suffix.lower() == ".onnx":
        return ("an ONNX model", "crasmra commands need the .ckpt written by `crasmra fit` or "
                "a .safetensors export; run ONNX files with onnxruntime.", False)
    if _looks_like_text(head):
        return "a text file", _CHECKPOINT_HINT, True
    return ("in an unknown format (neither a zip archive, the format of torch.save since "
            "PyTorch 1.6, nor a legacy torch or safetensors file)",
            "The file is damaged or of another kind; " + _CHECKPOINT_HINT, False)


def check_checkpoint_argument(path: str | Path, usage: str) -> None:
    """Refuse at once a command's checkpoint argument that is missing or plainly no checkpoint.

    Only the first bytes are read; the full checks happen when the file is loaded. A text file
    or an image in the checkpoint's place usually means the checkpoint was left out of the
    command line, so the message shows the usage.

    Args:
        path: The command's checkpoint argument.
        usage: The command's synopsis, e.g. ``"crasmra predict CHECKPOINT IMAGE..."``.

    Raises:
        UsageError: The file does not exist or is no checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"The checkpoint {path} {what}. Usage: {usage} (CHECKPOINT: a .ckpt "
                         "written by `crasmra fit`/`crasmra demo`, or a .safetensors export).")
    if path.stat().st_size == 0:
        return  # load_checkpoint_file explains empty files
    try:
        verdict = _not_a_checkpoint(path)
    except OSError as err:
        raise UsageError(f"Cannot read the checkpoint {path} ({err.strerror or err}).") from err
    if verdict is None:
        return
    what, remedy, misplaced = verdict
    if misplaced:
        raise UsageError(f"The first argument, {path}, is {what}, not a checkpoint. Usage: "
                         f"{usage} (CHECKPOINT: a .ckpt written by `crasmra fit`/`crasmra "
                         "demo`, or a .safetensors export).")
    raise UsageError(f"{path} is {what}, not a checkpoint. {remedy}")


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if length <= 100 * 2**20 else {}
    except (OSError, ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def file_kind(path: str | Path) -> str | None:
    """What an existing file is, as far as overwriting it matters.

    Returns:
        ``"checkpoint"`` (a torch.save file: zip with ``data.pkl`` or legacy format, or a
        safetensors file without crasmra metadata), ``"torchscript"`` and ``"safetensors"``
        (crasmra exports: TorchScript with crasmra metadata, safetensors with the ``"crasmra"``
        entry), ``"other"``, or None when it does not exist or is not a regular file.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return None
        head = _head(path, 64)
    except OSError:
        return None
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(path)
        if any(n.endswith(f"/extra/{TORCHSCRIPT_META}") for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "checkpoint"
        return "other"
    if _LEGACY_TORCH_MAGIC in head[:32]:
        return "checkpoint"
    if _is_safetensors(head):
        meta = _safetensors_metadata(path)
        return "safetensors" if meta and SAFETENSORS_META_KEY in meta else "checkpoint"
    return "other"


# ---------------------------------------------------------------------------------------------
# Guarding outputs: never over an input or a checkpoint, never half-written
# ---------------------------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    out: str | Path,
    flag: str,
    *,
    inputs: Iterable[str | Path] = (),
    replaceable: Iterable[str] = (),
) -> None:
    """Refuse an output file that would replace one of the command's inputs or a checkpoint.

    Args:
        out: The file the command is about to write.
        flag: The option that named it (or produced it), for the message.
        inputs: Files the command reads (checkpoint, images); compared as files, so links
            and other spellings of the same path are caught.
        replaceable: Kinds from :func:`file_kind` that this output may replace: the command's
            own earlier output of the same kind (e.g. ``"torchscript"`` for a TorchScript
            export). Any other checkpoint, or any existing file with a checkpoint suffix that
            is not of such a kind, is refused.

    Raises:
        UsageError: Writing ``out`` would destroy an input or a checkpoint.
    """
    out = Path(out).expanduser()
    if not os.path.lexists(out):
        return
    for source in inputs:
        if _same_file(out, Path(source)):
            raise UsageError(f"{flag} {out} is also an input of this command ({source}); "
                             "writing there would destroy it. Choose another output.")
    kind = file_kind(out)
    if kind in replaceable:
        return
    if kind in ("checkpoint", "torchscript", "safetensors") or (
            kind is not None and out.suffix.lower() in CHECKPOINT_SUFFIXES):
        raise UsageError(f"{flag} {out} exists and holds a checkpoint or model weights; crasmra "
                         "never writes over one. Choose another output name, or move the file "
                         "away first.")


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
