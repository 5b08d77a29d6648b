"""The exponential moving average of the weights along the training steps
(``--model.finetune.ema_epochs``).

Polyak averaging (Polyak and Juditsky, 1992) as timm's ``ModelEmaV3`` keeps it: after every
optimiser step the average moves ``1 - decay`` of the way to the network's weights. With a
few hundred photos one run's last weights depend on the last batches it drew and, through
CRAM's thresholded mask, on which channel that mask damps; the average of the last epochs'
weights smooths both. Its time constant is given in epochs so that one setting means the same
on 150 photos and on 3,000.
"""

from __future__ import annotations

import math

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import Tensor, nn

__all__ = ["TrajectoryAverage", "ema_decay"]


def ema_decay(epochs: float, steps_per_epoch: float) -> float:
    """The per-step decay of an average whose time constant is ``epochs`` epochs:
    ``exp(-1 / (epochs * steps_per_epoch))``.

    After ``epochs`` epochs a weight's share of the average has fallen by a factor e.

    Raises:
        ValueError: ``epochs`` or ``steps_per_epoch`` is not positive.
    """
    if not epochs > 0 or not steps_per_epoch > 0:
        raise ValueError(f"the average's time constant ({epochs} epochs) and the steps per "
                         f"epoch ({steps_per_epoch}) must be positive.")
    return math.exp(-1.0 / (epochs * steps_per_epoch))


class TrajectoryAverage:
    """The exponential moving average of a network's state (parameters and buffers).

    A plain object, not a module: the averaged copy must stay out of the training module's
    parameters (the optimiser) and out of its state dict (the checkpoint's weights).

    Args:
        net: The network to average; its structure is copied, its values are replaced at the
            first :meth:`update`.
        decay: The per-step decay (:func:`ema_decay`).
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self._ema = ModelEmaV3(net, decay=decay)
        self._ema.module.requires_grad_(False)
        #: The optimiser steps averaged so far.
        self.steps = 0

    @property
    def decay(self) -> float:
        """The per-step decay."""
        return float(self._ema.decay)

    def update(self, net: nn.Module) -> None:
        """Average in ``net``'s state after an optimiser step; the first update copies it."""
        self.steps += 1
        # ModelEmaV3 copies at step 1 (decay 0) and decays from step 2 on.
        self._ema.update(net, step=self.steps)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged state, detached on the CPU, in ``net.state_dict()``'s keys."""
        return {key: value.detach().to("cpu", copy=True)
                for key, value in self._ema.module.state_dict().items()}

    def load(self, state: dict[str, Tensor], steps: int) -> None:
        """Continue from a saved average of ``steps`` steps (:meth:`state_dict`)."""
        self._ema.module.load_state_dict(state)
        self.steps = steps

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> None:
        """Replace ``net``'s state with the average (in place, keeping its memory format)."""
        for target, value in zip(net.state_dict().values(),
                                 self._ema.module.state_dict().values(), strict=True):
            target.copy_(value)
