"""The inputs of a prediction: files, folders and glob patterns, read in order."""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from crasmra.data import ImageLoadError, load_image
from crasmra.data.errors import DatasetRootError
from crasmra.data.generic import images_under

__all__ = ["Failure", "ImageFiles", "collate_good", "find_images", "ordered_loader"]


@dataclass
class Failure:
    """An input that could not be used, and why."""

    path: str
    reason: str


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns.

    A file named explicitly is kept whatever its extension. Duplicates are dropped, the
    order of ``inputs`` is kept and folders and globs are sorted.

    Returns:
        The image files, and a :class:`Failure` for every input that matched nothing.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            try:
                found = images_under(path)
            except DatasetRootError as err:
                failures.append(Failure(str(item), str(err)))
                continue
            if not found:
                failures.append(Failure(str(item), "folder holds no image files"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif _has_glob_magic(str(item)):
            try:
                matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
                found = [f for m in matches for f in (images_under(m) if m.is_dir() else [m])]
            except (DatasetRootError, RecursionError) as err:
                reason = (str(err) if isinstance(err, DatasetRootError)
                          else "the pattern reaches folders nested too deeply")
                failures.append(Failure(str(item), reason))
                continue
            if not found:
                failures.append(Failure(str(item), "no file matches this pattern"))
            files.extend(found)
        else:
            failures.append(Failure(str(item), "no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, failures


class ImageFiles(Dataset):
    """Image files -> ``(tensor or None, index, error)``; errors travel instead of raising."""

    def __init__(self, files: Sequence[Path], transform: Callable) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str | None]:
        try:
            image = load_image(self.files[index])
        except ImageLoadError as err:
            return None, index, err.reason
        try:
            return self.transform(image), index, None
        except (OSError, ValueError, RuntimeError) as err:
            # A decodable but unusable image (e.g. a degenerate size) is one bad file too.
            return None, index, f"cannot be transformed ({err})"


def collate_good(items: list[tuple[Tensor | None, int, str | None]]) -> dict[str, Any]:
    """A batch of the readable images, their indices and the ``(index, reason)`` of the rest."""
    good = [(x, i) for x, i, _ in items if x is not None]
    return {
        "images": torch.stack([x for x, _ in good]) if good else None,
        "indices": [i for _, i in good],
        "errors": [(i, e) for x, i, e in items if x is None],
    }


def ordered_loader(
    dataset: Dataset, batch_size: int, num_workers: int, collate: Callable
) -> DataLoader:
    """A DataLoader that keeps the dataset's order.

    Raises:
        ValueError: ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise ValueError(f"number of workers must be >= 0, got {num_workers}.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)
