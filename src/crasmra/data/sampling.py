"""Shuffling and loader-worker seeds that depend only on (seed, epoch), so a resumed run sees
the batches, and the random augmentations, it would have seen."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = [
    "EpochIndex",
    "EpochSeededDataset",
    "EpochShuffleSampler",
    "loader_base_seed",
    "with_transform",
]


def loader_base_seed(generator_seed: int) -> int:
    """The ``base_seed`` a DataLoader iterator draws for its workers from a generator that was
    just seeded with ``generator_seed`` (PyTorch: one int64 drawn from ``loader.generator``
    when the iterator is created; worker ``i`` is seeded with ``base_seed + i``)."""
    generator = torch.Generator().manual_seed(generator_seed)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class EpochIndex(int):
    """A dataset index that also carries its epoch, the epoch's worker ``base_seed`` and the
    pass over the sampler it belongs to.

    It is an ``int``, so any dataset indexes with it as before; :class:`EpochSeededDataset`
    reads the extra attributes in a loader worker.
    """

    epoch: int
    base_seed: int
    pass_id: int

    def __new__(cls, value: int, epoch: int, base_seed: int, pass_id: int = 0) -> EpochIndex:
        index = super().__new__(cls, value)
        index.epoch = epoch
        index.base_seed = base_seed
        index.pass_id = pass_id
        return index

    def __reduce__(self) -> tuple[Any, ...]:  # indices travel to the workers pickled
        return (EpochIndex, (int(self), self.epoch, self.base_seed, self.pass_id))


class EpochSeededDataset(Dataset):
    """A training set whose loader workers start every epoch from the random state of a fresh
    worker of that epoch.

    A persistent worker (``persistent_workers=True``, the default) keeps its random stream
    from one epoch to the next: the random crops and flips of epoch ``e`` depend on every
    draw made since the worker started, a state no checkpoint can hold, so a run resumed at
    epoch ``e`` (fresh workers) augmented differently from the run it continues. Here, at the
    first item of each pass over the sampler (an epoch, seen from the :class:`EpochIndex` the
    sampler yields), a worker reseeds ``torch``, ``random`` and NumPy exactly as PyTorch seeds
    a new worker with that epoch's ``base_seed``. Persistent workers then draw what fresh ones
    would, so a resumed run, a run with ``persistent_workers=False`` and an uninterrupted run
    see the same augmentations.
    In the main process (``num_workers=0``) nothing is reseeded: its generators are the
    training's own, and a checkpoint restores them.

    Attribute reads fall through to the wrapped dataset (``classes``, ``bad_images``...).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._pass: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, EpochIndex) and (index.epoch, index.pass_id) != self._pass:
            info = get_worker_info()
            if info is not None:
                _seed_worker(index.base_seed, info.id)
            self._pass = (index.epoch, index.pass_id)
        return self.dataset[int(index)]


def _seed_worker(base_seed: int, worker_id: int) -> None:
    # What torch.utils.data's worker loop does when a worker starts.
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        from torch.utils.data._utils.worker import _generate_state
    except ImportError:  # pragma: no cover - NumPy is a dependency; a renamed helper is not
        return
    np.random.seed(_generate_state(base_seed, worker_id))


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
        #: The epoch the latest iteration was drawn for (None before the first). A loader
        #: iterator made before set_epoch (Lightning makes one when it sets up the data, and
        #: on resuming does not make another) shows here as an epoch other than ``epoch``.
        self.iterated_epoch: int | None = None
        self._passes = 0
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
        self.iterated_epoch = self.epoch
        self._passes += 1
        g = torch.Generator().manual_seed(self._epoch_seed())
        order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.generator is None:
            return iter(order)
        # The worker seed a fresh iterator of this epoch draws (the loader's generator was
        # just seeded by set_epoch), for EpochSeededDataset's persistent workers.
        base_seed = loader_base_seed(self._epoch_seed() + 1)
        return (EpochIndex(i, self.epoch, base_seed, self._passes) for i in order)

    def __len__(self) -> int:
        return self.num_samples


def with_transform(dataset: Dataset, transform: Callable[[Any], Any]) -> Dataset | None:
    """A copy of ``dataset`` whose images go through ``transform`` instead of its own.

    Wrappers that hold their data set in ``.dataset`` (:class:`EpochSeededDataset`, PyTorch's
    ``Subset``) are copied down to the data set that holds the ``transform``; nothing of
    ``dataset`` itself changes, so its loader keeps the training transform.

    Returns:
        The copy, or None when no level of ``dataset`` has a ``transform`` attribute of its
        own.
    """
    own = vars(dataset)
    if "transform" in own:
        view = copy.copy(dataset)
        view.transform = transform  # type: ignore[attr-defined]
        return view
    inner = own.get("dataset")
    if not isinstance(inner, Dataset):
        return None
    inner_view = with_transform(inner, transform)
    if inner_view is None:
        return None
    view = copy.copy(dataset)
    view.dataset = inner_view  # type: ignore[attr-defined]
    return view
