"""Backbones: a timm model split into stages, its names and its weights.

:class:`StagedBackbone` runs a timm CNN, Swin or plain ViT one stage at a time so that an
attention module can act between two stages (see :mod:`crasmra.backbones.staged`).
"""

from crasmra.backbones.families import CNN, HIERARCHICAL, TOKENS, backbone_family
from crasmra.backbones.plan import check_backbone, timm_size_options
from crasmra.backbones.segments import resolve_stage_indices
from crasmra.backbones.staged import StagedBackbone
from crasmra.backbones.weights import (
    PretrainedWeightsError,
    check_backbone_name,
    load_weights_file,
)

__all__ = [
    "CNN",
    "HIERARCHICAL",
    "TOKENS",
    "PretrainedWeightsError",
    "StagedBackbone",
    "backbone_family",
    "check_backbone",
    "check_backbone_name",
    "load_weights_file",
    "resolve_stage_indices",
    "timm_size_options",
]
