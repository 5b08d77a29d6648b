"""Checks of a torch zip archive before it is unpacked: checksums, zip bombs, what it holds."""

from __future__ import annotations

import zipfile
from pathlib import Path

from crasmra.checkpoint.format import MAX_ZIP_EXPANSION, ZIP_SLACK_BYTES, CheckpointError
from crasmra.file_kinds import ZIP_MAGIC, read_head

__all__ = ["one_line", "verify_zip_integrity", "weights_only_reason"]


def one_line(err: BaseException) -> str:
    """An error's message on one line."""
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
        if not read_head(path).startswith(ZIP_MAGIC):
            return
        with zipfile.ZipFile(path) as archive:
            _check_archive(archive, path)
            bad = archive.testzip()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {one_line(err)}). Use an "
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

