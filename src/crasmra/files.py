"""Writing files safely: outputs checked before any work, and replaced atomically.

A file is written next to its destination under a temporary name, flushed to disk and renamed
over it, so a crash or ``kill -9`` at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from crasmra.errors import CrasmraError, UsageError
from crasmra.file_kinds import CHECKPOINT_SUFFIXES, file_kind

__all__ = [
    "TMP_SUFFIX",
    "WriteError",
    "check_output",
    "check_writable",
    "plain_permissions",
    "replacing",
    "same_file",
    "save_atomic",
    "write_atomic",
    "write_json",
    "write_text",
]

log = logging.getLogger(__name__)

#: Suffix of the temporary file a file is written to before it is renamed into place.
TMP_SUFFIX = ".tmp"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_writable(path: str | Path, flag: str, *, folder: bool = False) -> None:
    """Fail before any work when a command's output cannot be written.

    Nothing is created: the nearest existing folder on the way to ``path`` must be a folder
    and accept a file (tested with a temporary file, which also catches read-only mounts).

    Args:
        path: The output file, or the output folder when ``folder`` is True.
        flag: The option that named it, for the message (e.g. ``"--out"``).
        folder: ``path`` is a folder the command writes into.

    Raises:
        UsageError: The path is under a file, is a file where a folder is needed (or the
            reverse), or its folder is not writable.
    """
    path = Path(path).expanduser()
    kind = "folder" if folder else "file"
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; choose a folder with {flag}.")
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name with {flag}.")
    if not folder and path.exists() and not path.is_file():
        return  # a device or a pipe (e.g. /dev/stdout), written in place
    start = path if folder else path.parent
    existing = _nearest_existing(start.absolute())
    if not existing.is_dir():
        raise UsageError(f"Cannot write {flag} {path}: {existing} is a file, not a folder. "
                         f"Choose another {kind} with {flag}.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".crasmra-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"Cannot write {flag} {path}: {existing} is not writable "
                         f"({err.strerror or err}). Choose another {kind} with {flag}.") from err


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix) that replaces it when the block succeeds.

    For writers that take a file name (e.g. matplotlib's ``savefig``, which picks the format
    from the suffix): the old file stays whole until the new one is complete. On an error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                               suffix=f"{TMP_SUFFIX}{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        plain_permissions(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, or straight into a device or pipe.

    ``-o /dev/stdout`` or a named pipe cannot be replaced by a rename (and must not be).
    """
    path = Path(path)
    try:
        special = path.exists() and not stat.S_ISREG(path.stat().st_mode)
    except OSError:
        special = False
    if special:
        with path.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
        return
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary file and a rename, so a crash never
    leaves half a file."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


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


def plain_permissions(path: str | Path) -> None:
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
        plain_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(err):
            free = shutil.disk_usage(path.parent).free
            raise WriteError(
                f"Could not write {path}: the disk is full ({free / 2**20:.0f} MiB free). "
                f"The file there before is intact. Free some space and run the command again "
                "(a training run: add --ckpt_path last to resume it)."
            ) from err
        raise
    _fsync_dir(path.parent)


class WriteError(CrasmraError, OSError):
    """A file could not be written for lack of space; the previous file is intact.

    The run failed rather than its input, hence exit status 1.
    """

    exit_code = 1


def _out_of_space(err: BaseException) -> bool:
    # OSError(ENOSPC) from plain writes and fsync; torch.save's zip writer reports the same
    # failure as a RuntimeError ("unexpected pos ..." / "file write failed").
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and (
        "unexpected pos" in str(err) or "file write failed" in str(err)
    )


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------
# Guarding outputs: never over an input or a checkpoint
# ---------------------------------------------------------------------------------------------
def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same existing file (links and other spellings too)."""
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
        if same_file(out, source):
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
