"""The ``.mat`` annotation files of Stanford Cars and Stanford Dogs, read and checked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from crasmra.data.benchmarks.common import few
from crasmra.data.errors import DatasetRootError

__all__ = [
    "check_mat_list",
    "loadmat",
    "mat_field",
    "str_list",
]


def loadmat(path: Path) -> dict:
    """A ``.mat`` file read with scipy; an unreadable one is a :class:`DatasetRootError`."""
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises several unrelated types for a bad .mat
        raise DatasetRootError(f"cannot read {path}: {err} (re-download it?)") from err


def mat_field(data: object, key: str, path: Path) -> np.ndarray:
    """``data[key]`` of a loaded .mat file (a dict or a struct array), at least 1-d."""
    try:
        return np.atleast_1d(data[key])  # type: ignore[index]
    except (KeyError, ValueError, IndexError) as err:
        raise DatasetRootError(
            f"{path} has no field {key!r}; it is not the original file: download it again"
        ) from err


def check_mat_list(
    name: str, path: Path, files: list[str], labels: np.ndarray, n_classes: int | None
) -> None:
    """Refuse a .mat list with unequal lengths, repeated files or class ids out of range.

    Ids are 1-based in the files; ``labels`` are 0-based. ``n_classes=None`` checks >= 1 only.
    """
    if len(files) != len(labels):
        raise DatasetRootError(
            f"{name}: {path} lists {len(files)} images but {len(labels)} class ids; it is "
            "damaged or not the original: download it again"
        )
    high = n_classes if n_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((labels < 0) | (labels >= high))
    if bad.size:
        shown = [f"{int(labels[i]) + 1} ({files[i]})" for i in bad]
        limit = f"1..{n_classes}" if n_classes is not None else ">= 1"
        raise DatasetRootError(
            f"{name}: {path} has {bad.size} class id(s) outside {limit}: {few(shown)}; the "
            "annotation files must come from one release: download them again"
        )
    repeated = sorted(f for f, n in Counter(files).items() if n > 1)
    if repeated:
        raise DatasetRootError(
            f"{name}: {path} lists {len(repeated)} image(s) more than once: {few(repeated)}; "
            "it is damaged or not the original: download it again"
        )


def str_list(values: object) -> list[str]:
    """A .mat array of names as stripped strings."""
    return [str(v).strip() for v in np.atleast_1d(values)]
