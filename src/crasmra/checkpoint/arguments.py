"""A command's checkpoint argument, refused at once when it is missing or plainly no checkpoint."""

from __future__ import annotations

from pathlib import Path

from crasmra.errors import UsageError
from crasmra.file_kinds import not_a_checkpoint

__all__ = ["check_checkpoint_argument"]


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
        verdict = not_a_checkpoint(path)
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
