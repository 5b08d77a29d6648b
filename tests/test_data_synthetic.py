"""The built-in synthetic set: deterministic, fine-grained by construction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from crasmra.data import SyntheticFGVC, create_dataset


def _pixels(ds: SyntheticFGVC, i: int) -> np.ndarray:
    return np.asarray(ds[i][0])


def test_deterministic_and_seeded() -> None:
    a, b = SyntheticFGVC("train", seed=3), SyntheticFGVC("train", seed=3)
    other = SyntheticFGVC("train", seed=4)
    assert a.targets == b.targets
    for i in (0, 7, 100):
        assert np.array_equal(_pixels(a, i), _pixels(b, i))
        assert not np.array_equal(_pixels(a, i), _pixels(other, i))
    assert np.asarray(a[0][0]).shape == (128, 128, 3)


def test_splits_sizes_and_disjoint_streams() -> None:
    train, val, test = (
        SyntheticFGVC(s, num_classes=5, samples_per_class=10, test_samples_per_class=4)
        for s in ("train", "val", "test")
    )
    assert (len(train), len(val), len(test)) == (45, 5, 20)
    assert not set(train.indices) & set(val.indices)
    assert sorted(val.targets) == list(range(5))
    assert not np.array_equal(_pixels(train, 0), _pixels(test, 0))
    assert len(SyntheticFGVC("test")) == 200 and len(SyntheticFGVC("train")) == 540
    with pytest.raises(ValueError, match="val_fraction"):
        SyntheticFGVC("val", val_fraction=0)


@pytest.mark.parametrize("num_classes", [2, 10, 27, 64, 200])
def test_classes_are_part_combinations(num_classes: int) -> None:
    ds = SyntheticFGVC("test", num_classes=num_classes, test_samples_per_class=1)
    assert len(ds.classes) == len(set(ds.classes)) == num_classes
    attrs = ds.attributes
    for x, y in itertools.pairwise(attrs):
        assert 1 <= sum(x[p] != y[p] for p in x) <= 2  # neighbours differ in one or two parts
    if num_classes >= 10:
        for part in attrs[0]:  # every part carries class information
            assert len({a[part] for a in attrs}) > 1


def test_create_dataset_synthetic_tensors() -> None:
    ds = create_dataset(
        "synthetic", None, "train", num_classes=4, samples_per_class=5, image_size=64
    )
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= label < 4
    native = create_dataset("synthetic", None, "test", native_size=96, test_samples_per_class=2)
    assert native[0][0].shape == (3, 96, 96)
    with pytest.raises(ValueError, match="does not take"):
        create_dataset("synthetic", None, "train", level="family")


def test_dataloader_workers_agree() -> None:
    ds = create_dataset(
        "synthetic", None, "test", num_classes=3, test_samples_per_class=2, image_size=48
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1)
    images, labels = next(iter(loader))
    assert torch.equal(images[2], ds[2][0]) and labels.tolist() == ds.targets
