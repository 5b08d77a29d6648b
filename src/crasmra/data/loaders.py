"""The DataLoaders of a data module: seeded generators, and workers only where there are any."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from crasmra.data.sampling import EpochShuffleSampler

__all__ = ["make_loader"]


def make_loader(
    dataset: Dataset | None,
    split: str,
    *,
    train: bool,
    distributed: bool,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    prefetch_factor: int | None,
    drop_last: bool,
) -> DataLoader:
    """The loader of one split's dataset.

    Args:
        dataset: The split's dataset; None when ``setup()`` has not built it.
        split: "train", "val" or "test", for the error message.
        train: Shuffle (once per epoch, seeded) and apply ``drop_last``.
        distributed: Whether the trainer runs on several processes (Lightning then replaces a
            shuffling loader's sampler).
        batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor, drop_last:
            The data module's settings; the worker-only ones apply only with workers, and
            ``pin_memory`` only with CUDA.

    Raises:
        RuntimeError: ``dataset`` is None.
    """
    if dataset is None:
        raise RuntimeError(f"the {split} dataset is not set up; call setup() first")
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    # Own generators everywhere: creating a loader's iterator then never draws from the
    # global RNG, whose state a resumed run restores (see EpochShuffleSampler).
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train and not distributed:
        sampler = EpochShuffleSampler(len(dataset), seed=seed, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        # Under DDP Lightning swaps a shuffling loader's sampler for a DistributedSampler,
        # which is seeded per epoch too.
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last and train,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
