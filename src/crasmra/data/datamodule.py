"""``FGVCDataModule``: the LightningDataModule the engine and the CLI use."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from crasmra.data.arguments import check_arguments, image_sizes, normalization
from crasmra.data.loaders import make_loader
from crasmra.data.splits import make_split, read_classes
from crasmra.data.transforms import DeviceNormalize, build_transforms

__all__ = ["FGVCDataModule"]

logger = logging.getLogger(__name__)


def _plain_size(hw: tuple[int, int]) -> int | list[int]:
    return hw[0] if hw[0] == hw[1] else [hw[0], hw[1]]


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
        check_arguments(
            dataset, root, options, batch_size=batch_size, num_workers=num_workers,
            val_fraction=val_fraction, prefetch_factor=prefetch_factor,
            decode_backend=decode_backend, normalize_on_device=normalize_on_device,
            train_per_class=train_per_class, subset_seed=subset_seed,
        )
        crop, resize = image_sizes(image_size, resize_size)
        self.mean, self.std = normalization(backbone, mean, std)

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
        self._normalize: DeviceNormalize | None = None

        self._annotations, self.classes = read_classes(dataset, root, options, skip_bad_images)
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
        return make_split(
            self._annotations, split, self.build_transform(split == "train"),
            options=self.options, val_fraction=self.val_fraction, split_seed=self.split_seed,
            skip_bad_images=self.skip_bad_images, train_per_class=self.train_per_class,
            subset_seed=self.subset_seed, decode_backend=self.decode_backend,
        )

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``(N, 3, H, W)`` to float32 normalised with this module's mean/std."""
        if self._normalize is None:
            self._normalize = DeviceNormalize(self.mean, self.std)
        return self._normalize(images)

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
        trainer = getattr(self, "trainer", None)
        return make_loader(
            dataset, split, train=train,
            distributed=trainer is not None and trainer.world_size > 1,
            batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor,
            drop_last=self.drop_last,
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
