"""The real path: CUB photos in the official layout and an ImageNet-pretrained backbone file.

Uses ``../shared/realdata`` beside the repository (or the folder named by
``CRASMRA_REALDATA``): 293 CUB-200-2011 photos of 10 classes and EfficientNet-Lite0 weights in
timm format. Skipped, with the reason, where that folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, build_module
from crasmra.data import FGVCDataModule, create_dataset

REALDATA = Path(os.environ.get("CRASMRA_REALDATA", REPO.parent / "shared" / "realdata"))
CUB10 = REALDATA / "cub10" / "CUB_200_2011"
LITE0 = REALDATA / "weights" / "tf_efficientnet_lite0.imagenet.safetensors"

pytestmark = pytest.mark.skipif(
    not (CUB10.is_dir() and LITE0.is_file()),
    reason=f"real images and weights not found at {REALDATA} (set CRASMRA_REALDATA)",
)


def test_cub_loader_reads_the_real_photos() -> None:
    with pytest.warns(UserWarning, match="official"):
        train = create_dataset("cub", CUB10, "train", image_size=96, resize_size=110,
                               val_fraction=0.0)
    test = create_dataset("cub", CUB10, "test", image_size=96, resize_size=110)
    assert (len(train), len(test)) == (148, 145)
    assert train.classes[0] == "Black footed Albatross"
    assert len(train.classes) == 10
    assert sorted(set(train.targets)) == list(range(10))
    image, label = test[0]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    assert 0 <= label < 10
    # Real photos, normalised: neither constant nor out of range.
    assert image.std() > 0.2 and image.abs().max() < 5


@pytest.mark.parametrize("variant", ["cra-smra", "plain"])
def test_fine_tuning_from_the_pretrained_file_lowers_the_loss(variant: str) -> None:
    L.seed_everything(0)
    dm = FGVCDataModule(
        dataset="cub", root=str(CUB10), batch_size=8, num_workers=0, image_size=96,
        resize_size=110, val_fraction=0.0, backbone="tf_efficientnet_lite0",
    )
    dm.setup("fit")
    images, target = next(iter(dm.train_dataloader()))
    module = build_module(
        backbone="tf_efficientnet_lite0", pretrained=str(LITE0), variant=variant,
        num_classes=dm.num_classes, head_channels=64, head_hidden=64, lr_heads=0.05,
        lr_attention=0.05,
    )
    optimizer = torch.optim.SGD(module.parameter_groups(), momentum=0.9)
    losses = []
    module.train()
    for _ in range(6):
        optimizer.zero_grad()
        loss, _ = module.compute_loss(module(images), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_pretrained_file_gives_imagenet_features() -> None:
    """The weights load into the staged backbone: its stages differ from a random init's."""
    from crasmra.model import create_model

    pretrained = create_model("tf_efficientnet_lite0", 10, pretrained=str(LITE0)).eval()
    random = create_model("tf_efficientnet_lite0", 10, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = pretrained.backbone(x), random.backbone(x)
    assert all(not torch.allclose(u, v) for u, v in zip(a, b, strict=True))
