"""The CRA-SMRA network: staged timm backbone + per-stage attention + stage and concat heads.

The four variants of the paper's ablation (Table 3) differ only in the module after each
attended stage:

- ``"baseline"``: :class:`~crasmra.layers.IdentityAttention` (projection only).
- ``"cbam"``: :class:`~crasmra.layers.CBAMAttention` (timm's CBAM in CRAM's place).
- ``"cram"``: :class:`~crasmra.layers.CRAM`, trained without SMRAM.
- ``"cra-smra"``: :class:`~crasmra.layers.CRAM`, trained with SMRAM's diversity loss.

A fifth variant is the reference every fine-grained paper compares against:

- ``"plain"``: the timm model with its own head, fine-tuned as timm fine-tunes it
  (``forward_features`` then ``forward_head``: global pooling and the classifier on the last
  stage, reset to K classes), trained with plain cross-entropy. No attention, no stage heads,
  no SMRAM; its one head is named ``"classifier"`` (:data:`PLAIN_HEAD`), and the combined
  prediction is that head's softmax. The attention and head hyperparameters are accepted and
  ignored, so one sweep file can list it beside the paper's variants.

Any further attention module registered with
:func:`~crasmra.layers.registry.register_attention` is a variant under its own name.

One builder per variant: :class:`CRASMRANet` for the paper's variants and registered
attention modules, :class:`PlainNet` for ``"plain"``, both :class:`Network`;
:func:`build_network` picks one. :class:`NetConfig` (in :mod:`crasmra.model.config`) holds
every hyperparameter, its default and its check.

SMRAM is not part of the network: it is a training-only device, so it lives with the
loss in the training engine (see :func:`create_smram`), and a network saved or exported for
inference carries no SMRAM weights.
"""

from __future__ import annotations

from crasmra.backbones import PretrainedWeightsError
from crasmra.model.base import Network
from crasmra.model.config import (
    PAPER_VARIANTS,
    PAPER_VARIANTS_ATTENTION,
    PLAIN,
    VARIANTS,
    NetConfig,
    attention_of,
    normalized_head_weights,
    validate_hparams,
    variant_names,
)
from crasmra.model.crasmra_net import CRASMRANet
from crasmra.model.factory import build_network, create_model, create_smram
from crasmra.model.plain import PlainNet
from crasmra.outputs import PLAIN_HEAD, ModelOutput

__all__ = [
    "PAPER_VARIANTS",
    "PAPER_VARIANTS_ATTENTION",
    "PLAIN",
    "PLAIN_HEAD",
    "VARIANTS",
    "CRASMRANet",
    "ModelOutput",
    "NetConfig",
    "Network",
    "PlainNet",
    "PretrainedWeightsError",
    "attention_of",
    "build_network",
    "create_model",
    "create_smram",
    "normalized_head_weights",
    "validate_hparams",
    "variant_names",
]
