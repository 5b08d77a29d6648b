"""CRAM's suppression warm-up (``--model.finetune.suppression_warmup_epochs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crasmra.model import Network

__all__ = ["SuppressionWarmup"]


@dataclass(frozen=True)
class SuppressionWarmup:
    """CRAM's omega brought in gradually: 1 at step 0, ``omega`` from ``steps`` on.

    ``omega_t = 1 - (1 - omega) * min(1, t / steps)``: the mask first multiplies nothing,
    then its suppression deepens linearly to the configured factor.

    Attributes:
        omega: The configured suppression factor (the paper's 0.5).
        steps: Length of the warm-up in optimiser steps (0: no warm-up).
    """

    omega: float
    steps: int

    def omega_at(self, step: int) -> float:
        """The suppression factor in force at optimiser step ``step``."""
        if self.steps <= 0:
            return self.omega
        progress = min(1.0, max(0, step) / self.steps)
        return 1.0 - (1.0 - self.omega) * progress

    def apply(self, net: Network, step: int) -> float:
        """Set omega of every attention module that has one; return the value set."""
        value = self.omega_at(step)
        for module in net.attention:
            if hasattr(module, "omega"):
                module.omega = value
        return value
