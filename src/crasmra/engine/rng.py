"""Saving and restoring the global random number generators with every checkpoint."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

__all__ = ["RNGStateCallback"]


class RNGStateCallback(L.Callback):
    """Save the Python, NumPy and torch RNG states in checkpoints and restore them on resume.

    Lightning restores model, optimiser, scheduler and AMP-scaler state but not the global RNGs,
    which drive shuffling and augmentation. Restoring them at the start of the first resumed
    training epoch makes a resumed run repeat the uninterrupted one when it stopped between epochs.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": {
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A restart inside an epoch (step-interval checkpoints) continues that epoch without
        # an epoch-start hook: restore now rather than at the next epoch.
        if getattr(trainer.fit_loop, "restarted_mid_epoch", False):
            self._restore()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
        np_state = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
