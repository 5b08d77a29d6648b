"""Shuffling that depends only on (seed, epoch), so a resumed run sees the batches it would have."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, drawn from ``(seed, epoch)`` instead of the global RNG.

    PyTorch's ``RandomSampler`` and the DataLoader's worker seeds draw from the global torch RNG
    when the iterator is created, and Lightning creates iterators at different moments in a
    fresh and in a resumed run; batches after a resume would then differ. Lightning calls
    :meth:`set_epoch` at every epoch start (fresh or resumed), which here fixes both the order
    and the DataLoader's ``generator`` (the source of worker seeds), so the data an epoch sees
    depends on nothing but the seed and the epoch number.

    Args:
        num_samples: Size of the dataset.
        seed: Base seed (the run's ``seed_everything`` value).
        generator: The generator passed to the DataLoader as ``generator=``; reseeded per epoch.
    """

    def __init__(
        self, num_samples: int, seed: int = 0, generator: torch.Generator | None = None
    ) -> None:
        self.num_samples = num_samples
        self.seed = int(seed)
        self.generator = generator
        self.epoch = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation (and worker seeds) of ``epoch``."""
        self.epoch = int(epoch)
        if self.generator is not None:
            # Offset from the permutation's seed so that the two streams are independent.
            self.generator.manual_seed(self._epoch_seed() + 1)

    def _epoch_seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch * 7_919) % (2**63 - 1)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self._epoch_seed())
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
