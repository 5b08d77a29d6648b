"""Exceptions raised by the data package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from crasmra.errors import CrasmraError

__all__ = ["DatasetRootError", "ImageLoadError", "read_utf8"]


class DatasetRootError(CrasmraError, FileNotFoundError):
    """A dataset root is missing, has the wrong layout, or lacks listed files.

    The message names the expected layout, what is missing and where the data comes from,
    so the problem is reported before any training starts.
    """


# The last line of a DataLoader worker's traceback: "...ImageLoadError: cannot load image
# '<path repr>': <reason>".
_WORKER_LINE = re.compile(
    r"ImageLoadError: cannot load image ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): (.*)\s*\Z",
    re.DOTALL,
)


class ImageLoadError(CrasmraError, OSError):
    """An image file could not be decoded (truncated, corrupt, empty, not an image, too large).

    Attributes:
        path: The offending file.
    """

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:
            # torch's DataLoader re-raises a worker's exception as ``type(text)`` with the
            # worker's whole traceback as ``text``. Keeping the type (not torch's fallback
            # RuntimeError) lets the command line print our one-line message, recovered here.
            path, reason = _from_worker_text(str(path))
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")

    def __reduce__(self):  # keeps the exception picklable across DataLoader workers
        return (type(self), (self.path, self.reason))


def _from_worker_text(text: str) -> tuple[str, str]:
    """``(path, reason)`` from a DataLoader worker's traceback text of an ImageLoadError."""
    match = _WORKER_LINE.search(text)
    if match is None:
        return "<unknown file>", " ".join(text.split()[-40:])
    try:
        path = str(ast.literal_eval(match.group(1)))
    except (ValueError, SyntaxError):
        path = match.group(1)
    return path, match.group(2).strip()


def read_utf8(path: Path, advice: str, *, prefix: str = "", bom: bool = False) -> str:
    """The text of an annotation file; a file that is not UTF-8 is refused with file and line.

    Args:
        path: The file.
        advice: What the user should do about a file that is not UTF-8.
        prefix: Start of the message, e.g. ``"csv: "``.
        bom: Accept (and drop) a UTF-8 byte-order mark, as spreadsheet programs write one.

    Raises:
        DatasetRootError: The file is not UTF-8 text.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DatasetRootError(
            f"{prefix}{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); {advice}"
        ) from err
