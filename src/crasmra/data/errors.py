"""Exceptions raised by the data package."""

from __future__ import annotations

from crasmra.errors import CrasmraError

__all__ = ["DatasetRootError", "ImageLoadError"]


class DatasetRootError(CrasmraError, FileNotFoundError):
    """A dataset root is missing, has the wrong layout, or lacks listed files.

    The message names the expected layout, what is missing and where the data comes from,
    so the problem is reported before any training starts.
    """


class ImageLoadError(CrasmraError, OSError):
    """An image file could not be decoded (truncated, corrupt, empty, not an image, too large).

    Attributes:
        path: The offending file.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")

    def __reduce__(self):  # keeps the exception picklable across DataLoader workers
        return (type(self), (self.path, self.reason))
