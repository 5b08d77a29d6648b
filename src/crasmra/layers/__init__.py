"""Pure ``nn.Module`` building blocks (torch and timm.layers only)."""

from crasmra.layers.cram import (
    CONV_LAYERS,
    CRAM,
    SUPPRESS_SOURCES,
    CBAMAttention,
    IdentityAttention,
    build_conv_layer,
    suppression_mask,
)
from crasmra.layers.heads import HEAD_POOLS, ClassifierHead
from crasmra.layers.smram import DIVERSITY_FORMS, SMRAM, diversity_loss

__all__ = [
    "CONV_LAYERS",
    "CRAM",
    "DIVERSITY_FORMS",
    "HEAD_POOLS",
    "SMRAM",
    "SUPPRESS_SOURCES",
    "CBAMAttention",
    "ClassifierHead",
    "IdentityAttention",
    "build_conv_layer",
    "diversity_loss",
    "suppression_mask",
]
