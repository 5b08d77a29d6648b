"""Training engine: the LightningModule that owns the network, SMRAM, the loss and the metrics.

This is the one place where model, loss, data and optimiser meet (see ARCHITECTURE.md). The
inference network (:class:`crasmra.model.Network`) carries no training-only parameters:
SMRAM lives here, next to the loss, and is dropped from every exported model.

:class:`CRASMRAModule` receives typed parts, each a group of ``--model.*`` flags:
``net`` (:class:`~crasmra.model.NetConfig`), ``loss`` (:class:`~crasmra.losses.LossWeights`),
``optim`` (:class:`OptimConfig`), ``finetune`` (:class:`FinetuneConfig`) and ``runtime``
(:class:`RuntimeConfig`). The policies that are not the model sit in modules of their own:
the non-finite-loss guard (:class:`NonFiniteGuard`), the backbone's freezing and BatchNorm
policy (:class:`BackbonePolicy`), the schedule (:class:`WarmupCosine`) and the RNG state
(:class:`RNGStateCallback`).
"""

from __future__ import annotations

from crasmra.engine.freezing import BackbonePolicy
from crasmra.engine.module import CRASMRAModule
from crasmra.engine.nonfinite import NonFiniteGuard, NonFiniteLossError
from crasmra.engine.parts import (
    MAX_LR,
    FinetuneConfig,
    NonFinitePolicy,
    OptimConfig,
    RuntimeConfig,
)
from crasmra.engine.rng import RNGStateCallback
from crasmra.engine.schedule import WarmupCosine, build_scheduler
from crasmra.losses import LossWeights
from crasmra.metric_names import COMBINED, MONITOR
from crasmra.model import NetConfig

__all__ = [
    "COMBINED",
    "MAX_LR",
    "MONITOR",
    "BackbonePolicy",
    "CRASMRAModule",
    "FinetuneConfig",
    "LossWeights",
    "NetConfig",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "NonFinitePolicy",
    "OptimConfig",
    "RNGStateCallback",
    "RuntimeConfig",
    "WarmupCosine",
    "build_scheduler",
]
