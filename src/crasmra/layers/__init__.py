"""Pure ``nn.Module`` building blocks (torch and timm.layers only)."""

from crasmra.layers.cram import (
    CONV_LAYERS,
    CRAM,
    DEFAULT_DELTA,
    DEFAULT_OMEGA,
    DEFAULT_REDUCTION,
    SUPPRESS_SOURCES,
    CBAMAttention,
    IdentityAttention,
    build_conv_layer,
    check_delta,
    check_omega,
    check_suppress_top_k,
    record_channel_importance,
    suppression_mask,
    top_k_suppression_mask,
)
from crasmra.layers.heads import HEAD_POOLS, ClassifierHead
from crasmra.layers.registry import (
    attention_names,
    create_attention,
    get_attention,
    register_attention,
)
from crasmra.layers.smram import DIVERSITY_FORMS, SMRAM, diversity_loss

__all__ = [
    "CONV_LAYERS",
    "CRAM",
    "DEFAULT_DELTA",
    "DEFAULT_OMEGA",
    "DEFAULT_REDUCTION",
    "DIVERSITY_FORMS",
    "HEAD_POOLS",
    "SMRAM",
    "SUPPRESS_SOURCES",
    "CBAMAttention",
    "ClassifierHead",
    "IdentityAttention",
    "attention_names",
    "build_conv_layer",
    "check_delta",
    "check_omega",
    "check_suppress_top_k",
    "create_attention",
    "diversity_loss",
    "get_attention",
    "record_channel_importance",
    "register_attention",
    "suppression_mask",
    "top_k_suppression_mask",
]
