"""crasmra: CRA-SMRA fine-grained visual classification.

Channel Re-attention (CRAM) and Spatial Multi-region Attention (SMRAM) for any timm CNN,
after Wang et al., "Rethinking Attention Mechanism: Channel Re-attention and Spatial
Multi-region Attention for Fine-grained Visual Classification", Neural Processing Letters 2025.

The public API::

    from crasmra import CRAM, SMRAM, create_model, CRASMRALoss
    net = create_model("resnet50", num_classes=200, variant="cra-smra", pretrained=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from crasmra._version import __version__

if TYPE_CHECKING:
    from crasmra.inference import load_model
    from crasmra.layers import CRAM, SMRAM, diversity_loss, suppression_mask
    from crasmra.losses import CRASMRALoss
    from crasmra.model import VARIANTS, CRASMRANet, ModelOutput, create_model

__all__ = [
    "CRAM",
    "SMRAM",
    "VARIANTS",
    "CRASMRALoss",
    "CRASMRANet",
    "ModelOutput",
    "__version__",
    "create_model",
    "diversity_loss",
    "load_model",
    "suppression_mask",
]

# Where each public name lives. They are imported on first use (PEP 562), so that
# `crasmra --version` and `crasmra --help` answer without importing torch.
_PUBLIC = {
    "CRAM": "crasmra.layers",
    "SMRAM": "crasmra.layers",
    "diversity_loss": "crasmra.layers",
    "suppression_mask": "crasmra.layers",
    "CRASMRALoss": "crasmra.losses",
    "VARIANTS": "crasmra.model",
    "CRASMRANet": "crasmra.model",
    "ModelOutput": "crasmra.model",
    "create_model": "crasmra.model",
    "load_model": "crasmra.inference",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'crasmra' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
