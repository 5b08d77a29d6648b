"""Fine-tuning a pretrained backbone: linear probing first, then the whole network."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from crasmra.data import FGVCDataModule
from crasmra.engine import CRASMRAModule
from test_engine import TINY_DATA as ENGINE_TINY_DATA

# The engine tests' tiny synthetic set, trained on whole (no validation split).
TINY_DATA = {**ENGINE_TINY_DATA, "val_fraction": 0.0}


def _fit(tmp_path: Path, epochs: int, **model_kwargs) -> tuple[CRASMRAModule, CRASMRAModule]:
    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    module = CRASMRAModule(
        backbone="resnet10t",
        pretrained=False,
        num_classes=dm.num_classes,
        head_channels=16,
        head_hidden=16,
        lr_backbone=0.05,
        lr_attention=0.05,
        lr_heads=0.05,
        weight_decay=1e-3,
        **model_kwargs,
    )
    initial = copy.deepcopy(module)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    return initial, module


def _changed(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, bool]:
    """Per state-dict entry (weights and BatchNorm statistics): did training change it?"""
    a, b = before.state_dict(), after.state_dict()
    return {k: not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()}


@pytest.mark.parametrize("variant", ["cra-smra", "plain"])
def test_frozen_epochs_leave_the_backbone_as_loaded(tmp_path: Path, variant: str) -> None:
    initial, trained = _fit(tmp_path, epochs=1, variant=variant, freeze_backbone_epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    classifier_keys = {"model." + k for k in ("fc.weight", "fc.bias")}
    frozen = {k: v for k, v in backbone.items() if k not in classifier_keys}
    assert frozen and not any(frozen.values()), [k for k, v in frozen.items() if v]
    # BatchNorm statistics are part of what the backbone knows: they stay too.
    assert any(k.endswith("running_mean") for k in frozen)
    if variant == "plain":
        assert all(backbone[k] for k in classifier_keys)  # timm's classifier trains
    else:
        heads = _changed(initial.net.heads, trained.net.heads)
        attention = _changed(initial.net.attention, trained.net.attention)
        assert all(v for k, v in heads.items() if k.endswith("weight"))
        assert any(attention.values())


def test_backbone_is_fine_tuned_after_the_frozen_epochs(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=2, freeze_backbone_epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    weights = [v for k, v in backbone.items() if k.endswith("conv1.weight")]
    assert weights and all(weights)
    assert not trained.backbone_frozen
    assert all(p.requires_grad for p in trained.net.parameters())


def test_without_freezing_the_backbone_trains_from_the_start(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    assert all(v for k, v in backbone.items() if k.endswith("conv1.weight"))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_freeze_backbone_epochs_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="freeze_backbone_epochs"):
        CRASMRAModule(backbone="resnet10t", num_classes=3, freeze_backbone_epochs=bad)


def test_frozen_batchnorm_statistics_with_a_training_backbone(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=1, freeze_backbone_bn=True)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    stats = {k: v for k, v in backbone.items() if k.endswith(("running_mean", "running_var"))}
    assert stats and not any(stats.values())
    # Their scale and shift, and every convolution, still train.
    assert all(v for k, v in backbone.items() if k.endswith("conv1.weight"))
    assert any(v for k, v in backbone.items() if k.endswith("bn1.weight"))
    # The heads' own BatchNorm layers are not the backbone's: they keep training mode.
    heads = _changed(initial.net.heads, trained.net.heads)
    assert any(v for k, v in heads.items() if k.endswith("running_mean"))
