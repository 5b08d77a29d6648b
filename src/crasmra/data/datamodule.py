"""``FGVCDataModule``: the LightningDataModule the engine and the CLI use."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from crasmra.data.base import Annotations, FGVCImageDataset, check_train_per_class
from crasmra.data.errors import DatasetRootError
from crasmra.data.factory import (
    SYNTHETIC_SUBSET_ERROR,
    build_split,
    check_options,
    create_dataset,
    dataset_classes,
    dataset_names,
    load_annotations,
)
from crasmra.data.sampling import EpochShuffleSampler
from crasmra.data.transforms import (
    BACKENDS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    build_transforms,
    default_resize_size,
    normalization_for_backbone,
    to_hw,
)

__all__ = ["FGVCDataModule"]

logger = logging.getLogger(__name__)


def _plain_size(hw: tuple[int, int]) -> int | list[int]:
    return hw[0] if hw[0] == hw[1] else [hw[0], hw[1]]


def _check_stats(
    name: str, values: Sequence[float] | None, positive: bool
) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from err
    if len(out) != 3 or (positive and min(out) <= 0):
        raise ValueError(
            f"{name} must be 3 numbers{' > 0' if positive else ''} (one per RGB channel), "
            f"got {values!r}"
        )
    return out


class FGVCDataModule(L.LightningDataModule):
    """Train/val/test loaders of a fine-grained dataset with the paper's transforms.

    Arguments are validated and the class list is read (validating the dataset root) in
    ``__init__``, so ``classes`` and ``num_classes`` are available right after
    construction and a wrong root fails before any training starts.

    Args:
        dataset: "cub", "aircraft", "cars", "dogs", "folder", "csv" or "synthetic".
        root: Dataset root (see :func:`create_dataset`); unused for "synthetic".
        batch_size: Images per batch (the paper: 20).
        num_workers: DataLoader worker processes.
        image_size: Crop size, int or ``(h, w)`` (the paper: 448).
        resize_size: Resize before cropping; default ``round(image_size * 550 / 448)``.
        random_crop: Random crop in training; False (default, the paper's recipe) takes the
            centre crop, the same window as evaluation.
        hflip: Random horizontal flip in training.
        val_fraction: Share of the official training set held out for validation; 0
            disables validation.
        split_seed: Seed of the train/val split.
        backbone: timm model name whose pretrained mean/std to use (only read for those).
        mean: Normalisation mean; overrides ``backbone``'s.
        std: Normalisation std; overrides ``backbone``'s.
        skip_bad_images: Skip unreadable images (one warning each) instead of failing.
        pin_memory: Pin host memory (only used when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        prefetch_factor: Batches prefetched per worker (only with ``num_workers > 0``).
        drop_last: Drop the last incomplete training batch.
        options: Dataset-specific options, e.g. ``{"level": "family"}`` (aircraft),
            ``{"bbox_crop": True}``, ``{"num_classes": 10}`` (synthetic).
        decode_backend: "pil" (PIL decode and transforms) or "tensor" (torchvision decode
            to ``uint8`` tensors and ``transforms.v2``; about twice the images/s per worker,
            see :func:`build_transforms`). Checkpoints record the PIL eval transform either
            way (the tensor eval transform gives the same pixels), so inference is unchanged.
        normalize_on_device: Only with "tensor": workers return ``uint8`` batches (a quarter
            of the bytes to pin and copy) and :meth:`on_after_batch_transfer` converts them
            to normalised float32 on the device. The batches then reach the model through
            the trainer only; a loader iterated by hand yields ``uint8`` images.
        train_per_class: Few-shot training: keep this many photos per class of the
            training split (``--data.train_per_class N``), drawn with ``subset_seed`` after
            the validation split was carved out, so validation photos never enter it (with
            ``val_fraction`` 0, from the whole official training split). For one seed the
            subsets are nested (the 1-photo subset is inside the 2-photo one), so a few-shot
            curve adds photos rather than redrawing them. A class with fewer photos keeps
            all of them (one warning). None (default) trains on the whole split. Validation
            and test splits are unchanged. Not for "synthetic" (use
            ``options: {samples_per_class: N}``).
        subset_seed: Seed of the ``train_per_class`` subset (``--data.subset_seed``).
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        batch_size: int = 20,
        num_workers: int = 4,
        image_size: int | tuple[int, int] = 448,
        resize_size: int | tuple[int, int] | None = None,
        random_crop: bool = False,
        hflip: bool = True,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        backbone: str | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        skip_bad_images: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        drop_last: bool = False,
        options: dict[str, Any] | None = None,
        decode_backend: str = "pil",
        normalize_on_device: bool = False,
        train_per_class: int | None = None,
        subset_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        options = dict(options or {})
        if dataset not in dataset_names():
            raise ValueError(
                f"unknown dataset {dataset!r}; choose one of {', '.join(dataset_names())}"
            )
        check_options(dataset, options)
        if dataset != "synthetic" and root is None:
            raise ValueError(
                f"dataset {dataset!r} needs root= (the folder its archive was extracted into)"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                "num_workers must be an int >= 0 (0 loads in the main process), "
                f"got {num_workers!r}"
            )
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1), got {val_fraction}; use 0 to disable validation"
            )
        if prefetch_factor is not None and (
            not isinstance(prefetch_factor, int) or prefetch_factor < 1
        ):
            raise ValueError(
                f"prefetch_factor must be None or an int >= 1, got {prefetch_factor!r}"
            )
        if decode_backend not in BACKENDS:
            raise ValueError(
                f"decode_backend must be one of {', '.join(map(repr, BACKENDS))}, "
                f"got {decode_backend!r}"
            )
        if normalize_on_device and decode_backend != "tensor":
            raise ValueError(
                "normalize_on_device=True needs decode_backend='tensor' (the PIL pipeline "
                "normalises in the workers); set decode_backend: tensor or turn it off"
            )
        check_train_per_class(train_per_class, subset_seed)
        if dataset == "synthetic" and train_per_class is not None:
            raise ValueError(SYNTHETIC_SUBSET_ERROR)
        crop = to_hw(image_size, "image_size")
        resize = (
            default_resize_size(crop) if resize_size is None else to_hw(resize_size, "resize_size")
        )
        if resize[0] < crop[0] or resize[1] < crop[1]:
            raise ValueError(
                f"image_size {crop} is larger than resize_size {resize}; lower image_size or raise "
                "resize_size (the paper: 448 from 550), or leave resize_size unset"
            )
        base_mean, base_std = (
            normalization_for_backbone(backbone)
            if backbone
            else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        )
        self.mean = _check_stats("mean", mean, positive=False) or tuple(base_mean)
        self.std = _check_stats("std", std, positive=True) or tuple(base_std)

        self.dataset = dataset
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = crop
        self.resize_size = resize
        self.random_crop = random_crop
        self.hflip = hflip
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.skip_bad_images = skip_bad_images
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self.options = options
        self.decode_backend = decode_backend
        self.normalize_on_device = bool(normalize_on_device)
        self.train_per_class = None if train_per_class is None else int(train_per_class)
        self.subset_seed = int(subset_seed)
        self._device_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        self._annotations: Annotations | None = None
        if dataset == "synthetic":
            self.classes = dataset_classes("synthetic", None, **options)
        else:
            loader_options = {k: v for k, v in options.items() if k != "bbox_crop"}
            self._annotations = load_annotations(
                dataset, root, skip_bad_images=skip_bad_images, **loader_options
            )
            self.classes = list(self._annotations.classes)
            if len(self.classes) < 2:
                # Caught here, where the data is named; otherwise torchmetrics refuses
                # num_classes=1 when the model is built, in its own words. (Not in the
                # readers: one class is fine for create_dataset, e.g. to evaluate a subset.)
                raise DatasetRootError(
                    f"{dataset}: {root} has one class ({self.classes[0]!r}); a "
                    "classifier needs at least 2 classes: add images of the other classes"
                )
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        logger.info("%s: %d classes", dataset, len(self.classes))

    @property
    def num_classes(self) -> int:
        """Number of classes (available right after construction)."""
        return len(self.classes)

    @property
    def has_val(self) -> bool:
        """Whether a validation split exists (``val_fraction > 0`` or an official val list)."""
        return self.val_fraction > 0 or (
            self._annotations is not None and self._annotations.val is not None
        )

    @property
    def transform_config(self) -> dict[str, Any]:
        """Plain values; ``build_transforms(train=False, **cfg)`` rebuilds the eval transform.

        The backend is deliberately not recorded: inference feeds PIL images to the PIL eval
        transform, which the "tensor" eval transform reproduces (see ``decode_backend``).
        """
        return {
            "image_size": _plain_size(self.image_size),
            "resize_size": _plain_size(self.resize_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def build_transform(self, train: bool):
        """The train or eval transform of this data module."""
        return build_transforms(
            train,
            image_size=self.image_size,
            resize_size=self.resize_size,
            mean=self.mean,
            std=self.std,
            random_crop=self.random_crop,
            hflip=self.hflip,
            backend=self.decode_backend,
            normalize=not self.normalize_on_device,
        )

    def _make(self, split: str) -> Dataset:
        transform = self.build_transform(split == "train")
        if self._annotations is None:
            return create_dataset(
                "synthetic",
                None,
                split,
                transform=transform,
                val_fraction=self.val_fraction,
                split_seed=self.split_seed,
                **self.options,
            )
        dataset = build_split(
            self._annotations,
            split,
            transform,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            bbox_crop=bool(self.options.get("bbox_crop", False)),
            skip_bad_images=self.skip_bad_images,
            train_per_class=self.train_per_class,
            subset_seed=self.subset_seed,
        )
        # The synthetic set renders PIL images, which the tensor transforms convert; file
        # sets decode straight to tensors.
        if isinstance(dataset, FGVCImageDataset):
            dataset.decode_backend = self.decode_backend
        return dataset

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``(N, 3, H, W)`` to float32 normalised with this module's mean/std."""
        stats = self._device_stats.get(images.device)
        if stats is None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device)
            std = torch.tensor(self.std, dtype=torch.float32, device=images.device)
            # (x / 255 - mean) / std as one multiply-add: x * scale + shift.
            scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
            shift = (-mean / std).view(1, 3, 1, 1)
            stats = self._device_stats[images.device] = (scale, shift)
        scale, shift = stats
        return torch.addcmul(shift, images.to(torch.float32), scale)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``normalize_on_device``: normalise the ``uint8`` images of a batch on the device."""
        if not self.normalize_on_device or not isinstance(batch, (list, tuple)) or not batch:
            return batch
        images = batch[0]
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            return batch
        return type(batch)([self.normalize_batch(images), *batch[1:]])

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs ("fit", "validate", "test", "predict" or None)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._make("train")
        if stage in (None, "fit", "validate") and self.val_dataset is None and self.has_val:
            self.val_dataset = self._make("val")
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._make("test")

    def _loader(self, dataset: Dataset | None, split: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"the {split} dataset is not set up; call setup() first")
        workers = self.num_workers
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        # Own generators everywhere: creating a loader's iterator then never draws from the
        # global RNG, whose state a resumed run restores (see EpochShuffleSampler).
        generator = torch.Generator().manual_seed(seed)
        sampler = None
        trainer = getattr(self, "trainer", None)
        if train and not (trainer is not None and trainer.world_size > 1):
            sampler = EpochShuffleSampler(len(dataset), seed=seed, generator=generator)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # Under DDP Lightning swaps a shuffling loader's sampler for a DistributedSampler,
            # which is seeded per epoch too.
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last and train,
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches with the training transform."""
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; ``[]`` (Lightning then skips validation) with ``val_fraction=0``."""
        if not self.has_val:
            return []
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        """Official test set batches with the evaluation transform."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """The test set, for prediction."""
        return self._loader(self.test_dataset, "test")

    @property
    def bad_images(self) -> list[tuple[str, str]]:
        """Bad images skipped so far by this process's datasets (``skip_bad_images``)."""
        out: list[tuple[str, str]] = []
        for ds in (self.train_dataset, self.val_dataset, self.test_dataset):
            out.extend(getattr(ds, "bad_images", []))
        return out

    def teardown(self, stage: str | None = None) -> None:
        """Warn once with the number of bad images skipped in this process."""
        bad = self.bad_images
        if bad:
            logger.warning(
                "%d bad image(s) were skipped: %s", len(bad), ", ".join(p for p, _ in bad[:5])
            )
