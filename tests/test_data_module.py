"""Transforms, backbone normalisation, and FGVCDataModule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from PIL import Image

from crasmra.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DatasetRootError,
    FGVCDataModule,
    build_transforms,
    normalization_for_backbone,
)
from data_fixtures import build_cub

DATA_PKG = Path(__file__).resolve().parents[1] / "src" / "crasmra" / "data"


def test_transforms_shapes_and_validation() -> None:
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    train = build_transforms(True, image_size=64, resize_size=80)
    evaluate = build_transforms(False, image_size=(48, 64), resize_size=(60, 80))
    assert train(img).shape == (3, 64, 64) and evaluate(img).shape == (3, 48, 64)
    names = [type(t).__name__ for t in train.transforms]
    # The paper's default: centre crop in training too.
    assert names == ["Resize", "CenterCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    names = [
        type(t).__name__ for t in build_transforms(True, random_crop=True, hflip=False).transforms
    ]
    assert names == ["Resize", "RandomCrop", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in build_transforms(False).transforms][:2] == [
        "Resize",
        "CenterCrop",
    ]
    with pytest.raises(ValueError, match="resize_size"):
        build_transforms(True, image_size=448, resize_size=400)


def test_normalization_for_backbone() -> None:
    assert normalization_for_backbone("resnet50") == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    mean, std = normalization_for_backbone("vit_base_patch16_clip_224.openai")
    assert mean != IMAGENET_DEFAULT_MEAN and all(isinstance(v, float) for v in mean + std)
    assert normalization_for_backbone("no_such_model") == (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
    )


def test_data_never_imports_model_or_layers() -> None:
    for path in DATA_PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not name.startswith(("crasmra.model", "crasmra.layers")), (path, name)


def _synthetic_dm(**kw) -> FGVCDataModule:
    args = dict(
        batch_size=4,
        num_workers=0,
        image_size=32,
        options={"num_classes": 5, "samples_per_class": 6},
    )
    args.update(kw)
    return FGVCDataModule("synthetic", **args)


def test_datamodule_synthetic_loaders() -> None:
    dm = _synthetic_dm()
    assert dm.num_classes == 5 and len(dm.classes) == 5  # before setup()
    assert dm.hparams["dataset"] == "synthetic" and dm.hparams["options"]["num_classes"] == 5
    assert dm.resize_size == (39, 39)  # round(32 * 550 / 448)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    assert len(dm.val_dataloader().dataset) == 5
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 100  # 20 per class
    loader = dm.predict_dataloader()
    assert loader.persistent_workers is False and loader.prefetch_factor is None
    assert loader.pin_memory == torch.cuda.is_available()


def test_transform_config_round_trip() -> None:
    dm = _synthetic_dm(image_size=(32, 40), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cfg = dm.transform_config
    assert cfg == {
        "image_size": [32, 40],
        "resize_size": [39, 49],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    img = Image.new("RGB", (70, 50), (200, 100, 0))
    assert torch.equal(build_transforms(train=False, **cfg)(img), dm.build_transform(False)(img))
    clip = FGVCDataModule("synthetic", num_workers=0, backbone="vit_base_patch16_clip_224.openai")
    assert clip.transform_config["mean"] == list(
        normalization_for_backbone("vit_base_patch16_clip_224.openai")[0]
    )
    assert (
        clip.transform_config["image_size"] == 448 and clip.transform_config["resize_size"] == 550
    )


def test_val_fraction_zero_skips_validation() -> None:
    dm = _synthetic_dm(val_fraction=0)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and len(dm.train_dataset) == 30


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"image_size": 64, "resize_size": 32}, "resize_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"options": {"levels": 1}}, "does not take"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"dataset": "cub"}, "root"),
    ],
)
def test_datamodule_validation(kwargs: dict, match: str) -> None:
    args = {"dataset": "synthetic", "num_workers": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        FGVCDataModule(**args)


def test_datamodule_reads_classes_and_checks_root_at_init(tmp_path: Path) -> None:
    with pytest.raises(DatasetRootError, match="Expected layout"):
        FGVCDataModule("cub", str(tmp_path / "empty"), num_workers=0)
    root = build_cub(tmp_path / "cub")
    dm = FGVCDataModule(
        "cub", str(root), num_workers=0, batch_size=2, image_size=16, val_fraction=0.2
    )
    assert dm.num_classes == 200 and dm.classes[0] == "Black footed Albatross"
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 5994 and len(dm.test_dataset) == 5794
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 16, 16)
