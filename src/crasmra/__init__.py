"""crasmra: CRA-SMRA fine-grained visual classification.

Channel Re-attention (CRAM) and Spatial Multi-region Attention (SMRAM) for any timm CNN,
after Wang et al., "Rethinking Attention Mechanism: Channel Re-attention and Spatial
Multi-region Attention for Fine-grained Visual Classification", Neural Processing Letters 2025.

The public API::

    from crasmra import CRAM, SMRAM, create_model, CRASMRALoss
    net = create_model("resnet50", num_classes=200, variant="cra-smra", pretrained=True)
"""

from __future__ import annotations

from crasmra._version import __version__
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


def __getattr__(name: str):
    # load_model pulls in the inference stack (safetensors, Lightning checkpoints); import it
    # on first use so that `import crasmra` stays light.
    if name == "load_model":
        from crasmra.inference import load_model

        return load_model
    raise AttributeError(f"module 'crasmra' has no attribute {name!r}")
