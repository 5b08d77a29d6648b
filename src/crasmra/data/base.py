"""Shared machinery: parsed annotations, seeded stratified splits, the image dataset."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from crasmra.data.errors import DatasetRootError, ImageLoadError
from crasmra.data.image import file_problem, load_image, load_image_tensor

__all__ = [
    "SPLITS",
    "Annotations",
    "FGVCImageDataset",
    "Record",
    "check_files_exist",
    "check_train_per_class",
    "few_shot_subset",
    "select_split",
    "stratified_split",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BBox = tuple[float, float, float, float]
MAX_LISTED_MISSING = 5


@dataclass(frozen=True)
class Record:
    """One annotated image: absolute path, 0-based label, optional box (x1, y1, x2, y2)."""

    path: str
    label: int
    bbox: BBox | None = None


@dataclass
class Annotations:
    """A dataset's parsed annotation files.

    Attributes:
        name: Dataset name ("cub", ...).
        root: The resolved root the paths live under.
        classes: Readable class names in label order.
        train: The official training records (CUB train, Aircraft trainval, ...).
        test: The official test records.
        val: An official validation list, if the dataset has one and it was requested;
            ``None`` means val is carved from ``train``.
        official_val_train: The training records that go with ``val`` (disjoint from it).
    """

    name: str
    root: Path
    classes: list[str]
    train: list[Record]
    test: list[Record]
    val: list[Record] | None = None
    official_val_train: list[Record] | None = None
    extra: dict = field(default_factory=dict)


def stratified_split(
    targets: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into (train, val), stratified by class and seeded.

    Every class with at least two samples sends ``round(n * val_fraction)`` of them, and
    at least one, to val, so model selection sees every class; at least one always stays
    in train. The result depends only on ``targets``, ``val_fraction`` and ``seed``.

    Args:
        targets: Label of every sample.
        val_fraction: Fraction in [0, 1) that goes to val; 0 returns an empty val.
        seed: Split seed.

    Returns:
        Sorted train indices and sorted val indices; disjoint, together all indices.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    targets_arr = np.asarray(targets, dtype=np.int64)
    if val_fraction == 0.0 or targets_arr.size == 0:
        return list(range(len(targets_arr))), []
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for cls in np.unique(targets_arr):
        idx = np.flatnonzero(targets_arr == cls)
        if idx.size < 2:
            continue
        n_val = min(max(1, round(idx.size * val_fraction)), idx.size - 1)
        val.extend(int(i) for i in rng.permutation(idx)[:n_val])
    val_set = set(val)
    train = [i for i in range(targets_arr.size) if i not in val_set]
    return train, sorted(val)


def check_train_per_class(train_per_class: object, subset_seed: object = 0) -> None:
    """Raise ``ValueError`` unless ``train_per_class`` is None or an int >= 1 and
    ``subset_seed`` an int >= 0, saying which option to change."""
    if train_per_class is not None and (
        isinstance(train_per_class, bool)
        or not isinstance(train_per_class, (int, np.integer))
        or train_per_class < 1
    ):
        raise ValueError(
            "train_per_class must be an integer >= 1 (photos per class), got "
            f"{train_per_class!r}; change --data.train_per_class (or leave it unset for "
            "the whole training split)"
        )
    if (
        isinstance(subset_seed, bool)
        or not isinstance(subset_seed, (int, np.integer))
        or subset_seed < 0
    ):
        raise ValueError(
            f"subset_seed must be an integer >= 0, got {subset_seed!r}; "
            "change --data.subset_seed"
        )


def few_shot_subset(
    records: Sequence[Record], per_class: int, seed: int = 0, *, name: str = "train"
) -> list[Record]:
    """Keep ``per_class`` seeded records of every class, in their original order.

    Each class draws its own permutation from ``numpy.random.default_rng((seed, label))``
    over its records in the order given (the annotation order) and keeps the first
    ``per_class``. The permutation depends neither on ``per_class`` nor on the other
    classes, so subsets are nested: for one seed, the 1-per-class subset is inside the
    2-per-class one, and so on. A class with fewer records keeps all of them (one warning
    says how many classes fell short).

    Args:
        records: The candidate records (e.g. the training split after val was carved out).
        per_class: Records kept per class, >= 1.
        seed: Subset seed, >= 0.
        name: Named in the warning.

    Returns:
        The kept records, in the order of ``records``.
    """
    check_train_per_class(per_class, seed)
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.label, []).append(i)
    keep: list[int] = []
    short = 0
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < per_class:
            short += 1
        order = np.random.default_rng((int(seed), int(label))).permutation(len(idx))
        keep.extend(idx[j] for j in order[:per_class])
    if short:
        logger.warning(
            "%s: %d of %d classes have fewer than train_per_class=%d training photos and "
            "keep all of theirs",
            name, short, len(by_class), per_class,
        )
    return [records[i] for i in sorted(keep)]


def select_split(
    ann: Annotations,
    split: str,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    train_per_class: int | None = None,
    subset_seed: int = 0,
) -> list[Record]:
    """The records of one split: train/val carved from the official train set, or test.

    Args:
        ann: Parsed annotations.
        split: "train", "val" or "test".
        val_fraction: Share of the official training set held out as val (0: none).
        split_seed: Seed of the train/val split.
        train_per_class: Only for "train": keep this many seeded photos per class (see
            :func:`few_shot_subset`), drawn after val was carved out, so val photos never
            enter it; None keeps the whole training split.
        subset_seed: Seed of that subset.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_train_per_class(train_per_class, subset_seed)
    if split == "test":
        return list(ann.test)
    if ann.val is not None:  # an official val list was requested (e.g. Aircraft)
        records = list(ann.val if split == "val" else ann.official_val_train or [])
    else:
        if split == "val" and val_fraction == 0:
            raise ValueError(
                "split='val' was requested but val_fraction=0 disables the validation split; "
                "set val_fraction > 0 (default 0.1) or do not ask for 'val'"
            )
        train_idx, val_idx = stratified_split(
            [r.label for r in ann.train], val_fraction, split_seed
        )
        chosen = val_idx if split == "val" else train_idx
        records = [ann.train[i] for i in chosen]
    if split == "train" and train_per_class is not None:
        records = few_shot_subset(records, train_per_class, subset_seed, name=f"{ann.name}/train")
    return records


def check_files_exist(
    paths: Sequence[str],
    *,
    dataset: str,
    layout: str,
    url: str,
    root: Path,
    allow_missing: bool = False,
) -> set[str]:
    """Stat every listed file; raise naming the missing ones and the ones that are no images.

    A listed path that exists but is not a regular file (a directory, a FIFO, a device) is
    refused here, before training, with :class:`ImageLoadError`: reading it later would block
    (a FIFO) or never end (``/dev/urandom``). File contents are checked when decoding.

    Args:
        paths: Files listed by the annotations.
        dataset, layout, url, root: For the error message.
        allow_missing: Warn once (with a count and the first few) instead of raising.

    Returns:
        The set of missing or unusable paths (empty unless ``allow_missing``).
    """
    missing = [p for p in paths if not os.path.exists(p)]
    missing_set = set(missing)
    unusable = [
        (p, problem)
        for p in paths
        if p not in missing_set and (problem := file_problem(p)) is not None
    ]
    if missing:
        listing = _listing(missing)
        if not allow_missing:
            raise DatasetRootError(
                f"{dataset}: {len(missing)} of {len(paths)} images listed in the annotations "
                f"are missing under {root}:\n{listing}\n"
                f"Expected layout:\n{layout}\n"
                f"Download from {url} and extract it completely "
                "(or pass skip_bad_images=True to skip missing files)."
            )
        warnings.warn(
            f"{dataset}: {len(missing)} of {len(paths)} listed images are missing under "
            f"{root} and are skipped (skip_bad_images=True):\n{listing}",
            stacklevel=3,
        )
    if unusable:
        if not allow_missing:
            path, problem = unusable[0]
            others = (
                f" ({len(unusable) - 1} more listed file(s) are not images either:\n"
                + _listing([p for p, _ in unusable[1:]])
                + ")"
                if len(unusable) > 1
                else ""
            )
            raise ImageLoadError(
                path,
                f"{problem}{others}; or pass skip_bad_images=True to skip such files",
            )
        warnings.warn(
            f"{dataset}: {len(unusable)} of {len(paths)} listed images are not image files "
            "(directories, FIFOs or devices) and are skipped "
            f"(skip_bad_images=True):\n{_listing([p for p, _ in unusable])}",
            stacklevel=3,
        )
    return missing_set | {p for p, _ in unusable}


def _listing(paths: Sequence[str]) -> str:
    """The first few ``paths``, one per indented line, and how many more there are."""
    shown = "\n".join(f"  {p}" for p in paths[:MAX_LISTED_MISSING])
    more = len(paths) - MAX_LISTED_MISSING
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def warn_counts(dataset: str, counts: Sequence[tuple[str, int, int]]) -> None:
    """One warning naming every split whose size differs from the official count.

    Args:
        dataset: The dataset's name.
        counts: ``(what, found, official)`` per count, e.g. ``("test images", 145, 5794)``.
    """
    differ = [f"found {found} {what}, the official count is {official}"
              for what, found, official in counts if found != official]
    if differ:
        warnings.warn(
            f"{dataset}: " + "; ".join(differ)
            + "; the annotation files may be a subset, modified or from another release",
            stacklevel=3,
        )


class FGVCImageDataset(Dataset):
    """Images listed by path with integer labels, loaded robustly, transformed on access.

    Items are ``(image, label)``; ``image`` is what ``transform`` makes of the RGB image
    (a float tensor ``(3, H, W)`` with the default transforms). With
    ``decode_backend="pil"`` the transform receives a PIL image (:func:`load_image`), with
    ``"tensor"`` a ``uint8`` tensor ``(3, H, W)`` (:func:`load_image_tensor`, for the
    ``backend="tensor"`` transforms).

    Attributes:
        classes: Readable class names in label order.
        samples: ``(path, label)`` pairs.
        targets: Labels.
        bboxes: Optional ``(x1, y1, x2, y2)`` box per sample (``None`` if the set has none).
        bad_images: ``(path, reason)`` of every image skipped so far (``skip_bad_images``).
            DataLoader workers keep their own copy of the dataset, so with
            ``num_workers > 0`` this list is per worker; see :meth:`verify_images`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        bbox_crop: bool = False,
        skip_bad_images: bool = False,
        name: str = "dataset",
        decode_backend: str = "pil",
    ) -> None:
        if decode_backend not in ("pil", "tensor"):
            raise ValueError(f"decode_backend must be 'pil' or 'tensor', got {decode_backend!r}")
        self.decode_backend = decode_backend
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(r.path, r.label) for r in records]
        self.targets = [r.label for r in records]
        self.bboxes: list[BBox | None] = [r.bbox for r in records]
        self.transform = transform
        self.bbox_crop = bbox_crop
        self.skip_bad_images = skip_bad_images
        self.name = name
        self.bad_images: list[tuple[str, str]] = []
        self._bad_paths: set[str] = set()
        if bbox_crop and any(b is None for b in self.bboxes):
            raise ValueError(f"{name}: bbox_crop=True but some samples have no bounding box")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """The RGB image of sample ``index`` (cropped to its box with ``bbox_crop``).

        A PIL image, or a ``uint8`` tensor ``(3, H, W)`` with ``decode_backend="tensor"``.
        """
        img = self._decode(self.samples[index][0])
        if self.bbox_crop:
            img = crop_to_box(img, self.bboxes[index])  # type: ignore[arg-type]
        return img

    def _decode(self, path: str) -> Image.Image | torch.Tensor:
        return load_image_tensor(path) if self.decode_backend == "tensor" else load_image(path)

    def _record_bad(self, path: str, err: ImageLoadError) -> None:
        if path in self._bad_paths:
            return
        self._bad_paths.add(path)
        self.bad_images.append((path, err.reason))
        warnings.warn(
            f"{self.name}: skipping bad image {path!r} ({err.reason}); "
            f"{len(self.bad_images)} bad image(s) skipped so far",
            stacklevel=3,
        )

    def __getitem__(self, index: int):
        n = len(self.samples)
        if n == 0:
            raise IndexError(f"{self.name} is empty")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} of size {n}")
        index = int(index) % n
        # A bad image is replaced by the next good one (cyclically): deterministic, so every
        # worker and every epoch substitute the same sample.
        for offset in range(n):
            i = (index + offset) % n
            path, label = self.samples[i]
            if self.skip_bad_images and path in self._bad_paths:
                continue
            try:
                img = self.load(i)
            except ImageLoadError as err:
                if not self.skip_bad_images:
                    raise
                self._record_bad(path, err)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise ImageLoadError(self.name, f"all {n} images failed to load")

    def verify_images(self) -> list[tuple[str, str]]:
        """Decode every image once; drop the bad ones (with ``skip_bad_images``) or raise.

        Slow on full benchmarks (it decodes every file), but gives one summary, in the
        main process, of every bad file before training.

        Returns:
            The ``(path, reason)`` pairs of all bad images found.
        """
        bad: list[tuple[str, str]] = []
        keep: list[int] = []
        for i, (path, _) in enumerate(self.samples):
            try:
                self._decode(path)
                keep.append(i)
            except ImageLoadError as err:
                if not self.skip_bad_images:
                    raise
                bad.append((path, err.reason))
                if path not in self._bad_paths:
                    self._bad_paths.add(path)
                    self.bad_images.append((path, err.reason))
        if bad:
            self.samples = [self.samples[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
            self.bboxes = [self.bboxes[i] for i in keep]
            warnings.warn(
                f"{self.name}: {len(bad)} bad image(s) removed, {len(keep)} remain: "
                + ", ".join(p for p, _ in bad[:MAX_LISTED_MISSING])
                + (" ..." if len(bad) > MAX_LISTED_MISSING else ""),
                stacklevel=2,
            )
        return bad

    def summary(self) -> str:
        """One line: size, classes and bad images skipped so far."""
        return (
            f"{self.name}: {len(self)} images, {len(self.classes)} classes, "
            f"{len(self.bad_images)} bad image(s) skipped"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"


def crop_to_box(img: Image.Image | torch.Tensor, bbox: BBox) -> Image.Image | torch.Tensor:
    """Crop to ``(x1, y1, x2, y2)`` clipped to the image; an empty box keeps the image.

    Takes a PIL image or a ``(..., H, W)`` tensor; both get the same pixel box.
    """
    x1, y1, x2, y2 = bbox
    if isinstance(img, torch.Tensor):
        h, w = img.shape[-2:]
    else:
        w, h = img.size
    box = (max(0, int(x1)), max(0, int(y1)), min(w, round(x2)), min(h, round(y2)))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return img
    if isinstance(img, torch.Tensor):
        return img[..., box[1] : box[3], box[0] : box[2]]
    return img.crop(box)
