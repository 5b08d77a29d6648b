"""Datasets, image loading, transforms and the LightningDataModule of crasmra.

Never imports ``crasmra.model`` or ``crasmra.layers``: backbone normalisation values are
read from timm's pretrained-config registry as plain numbers.

Example::

    from crasmra.data import create_dataset, FGVCDataModule
    test = create_dataset("cub", "/data", "test")          # official test split
    dm = FGVCDataModule("aircraft", "/data", options={"level": "family"})
    dm.num_classes                                         # 70, known before setup()
    fast = FGVCDataModule("cub", "/data", decode_backend="tensor", normalize_on_device=True)
"""

from crasmra.data.base import FGVCImageDataset, stratified_split
from crasmra.data.datamodule import FGVCDataModule
from crasmra.data.errors import DatasetRootError, ImageLoadError
from crasmra.data.factory import (
    DATASET_NAMES,
    create_dataset,
    dataset_classes,
    dataset_names,
    register_dataset,
)
from crasmra.data.image import load_image, load_image_tensor
from crasmra.data.synthetic import SyntheticFGVC
from crasmra.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    Preprocessing,
    build_transforms,
    normalization_for_backbone,
)

__all__ = [
    "DATASET_NAMES",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "DatasetRootError",
    "FGVCDataModule",
    "FGVCImageDataset",
    "ImageLoadError",
    "Preprocessing",
    "SyntheticFGVC",
    "build_transforms",
    "create_dataset",
    "dataset_classes",
    "dataset_names",
    "load_image",
    "load_image_tensor",
    "normalization_for_backbone",
    "register_dataset",
    "stratified_split",
]
