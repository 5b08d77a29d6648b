"""``--model.finetune.imprint_transform``: the view of the training images that the heads are
imprinted from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Subset

from conftest import build_module
from crasmra.data import FGVCDataModule
from crasmra.data.sampling import EpochSeededDataset, with_transform
from crasmra.engine.starting_weights import training_batches
from test_engine import TINY_DATA

# Random crops and flips in training, so that the two views differ on every image.
DATA = {**TINY_DATA, "val_fraction": 0.0, "random_crop": True, "hflip": True}


def _trainer(dm: FGVCDataModule) -> SimpleNamespace:
    """What training_batches reads of a Lightning trainer."""
    return SimpleNamespace(train_dataloader=dm.train_dataloader(), datamodule=dm,
                           strategy=SimpleNamespace(batch_to_device=lambda batch: batch))


def _images(trainer: SimpleNamespace, view: str) -> torch.Tensor:
    return torch.cat([images for images, _ in training_batches(trainer, False, view)])


def test_the_eval_view_is_the_evaluation_transform_of_every_training_image() -> None:
    dm = FGVCDataModule(**DATA)
    dm.setup("fit")
    trainer = _trainer(dm)
    torch.manual_seed(0)
    first, second = _images(trainer, "eval"), _images(trainer, "eval")
    assert torch.equal(first, second)  # no random draw
    # Each image is the data module's evaluation transform of the training image.
    eval_transform = dm.build_transform(train=False)
    untransformed = with_transform(dm.train_dataset, lambda img: img)
    assert untransformed is not None
    assert torch.allclose(first[0], eval_transform(untransformed[0][0]))
    # The training view draws crops and flips; the training loader keeps its transform.
    train_a, train_b = _images(trainer, "train"), _images(trainer, "train")
    assert not torch.equal(train_a, train_b)
    assert not torch.equal(train_a, first)
    assert not torch.equal(torch.cat([x for x, _ in trainer.train_dataloader]), first)


def test_with_transform_copies_down_the_wrappers_and_leaves_the_original_alone() -> None:
    dm = FGVCDataModule(**DATA)
    dm.setup("fit")
    inner = dm.train_dataset
    while "transform" not in vars(inner):
        inner = inner.dataset
    original = inner.transform
    wrapped = EpochSeededDataset(Subset(inner, [0, 1]))
    view = with_transform(wrapped, lambda img: "seen")
    assert view is not None and view[0][0] == "seen" and view[1][0] == "seen"
    assert inner.transform is original
    assert torch.is_tensor(wrapped[0][0])
    assert with_transform(Subset(list(range(3)), [0]), lambda img: img) is None


def test_without_an_eval_transform_the_training_view_is_used_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dm = FGVCDataModule(**DATA)
    dm.setup("fit")
    trainer = _trainer(dm)
    trainer.datamodule = None  # loaders given to fit() directly
    with caplog.at_level("WARNING"):
        images = _images(trainer, "eval")
    assert "no evaluation transform" in caplog.text
    assert images.shape[0] == len(dm.train_dataset)


def test_a_bad_imprint_transform_names_its_flag() -> None:
    with pytest.raises(ValueError, match=r"--model\.finetune\.imprint_transform"):
        build_module(backbone="resnet10t", num_classes=3, imprint_transform="test")
