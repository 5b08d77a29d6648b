"""The checkpoint a run starts from (``--ckpt_path``), read once, before anything is built.

A checkpoint that does not fit the network the options describe is refused while nothing is
allocated yet: the network is built on the meta device, where it has shapes but no memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crasmra.checkpoint import CheckpointError, load_checkpoint_file, network_hparams
from crasmra.engine import CRASMRAModule
from crasmra.flag_moves import nest_flat_hparams

__all__ = ["StartCheckpoint"]


class StartCheckpoint:
    """What a run keeps of the checkpoint it starts from.

    Attributes:
        global_step: The checkpoint's step, for the loggers (see ``default_loggers``'
            ``resume_step``); None until a checkpoint is read or when it stores none.
        shapes: The shapes of its tensors, by state-dict key.
        path: Where it was read from.
        num_classes: The class count its hyperparameters record.
    """

    def __init__(self) -> None:
        self.global_step: int | None = None
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.path: str | None = None
        self.num_classes: int | None = None

    def read(self, path: str | Path) -> dict[str, Any]:
        """Read and verify the checkpoint at ``path`` and keep what the checks need.

        Returns:
            The checkpoint itself.
        """
        checkpoint = load_checkpoint_file(path)
        step = checkpoint.get("global_step")
        self.global_step = step if isinstance(step, int) else None
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            self.shapes = {k: tuple(v.shape) for k, v in state.items()
                           if isinstance(v, torch.Tensor)}
            self.path = str(path)
        classes = network_hparams(checkpoint.get("hyper_parameters")).get("num_classes")
        self.num_classes = classes if isinstance(classes, int) else None
        return checkpoint

    def check_options(self, config: Any) -> None:
        """Refuse options (a subcommand's config) that describe another network.

        The class count comes from the data when the classes are instantiated; until then,
        the checkpoint's own stands in (a dataset of another class count is explained when
        the checkpoint is loaded).
        """
        if self.shapes is None or self.num_classes is None:
            return
        self.check_fits(self.skeleton(config, num_classes=self.num_classes), "the options")

    def check_hparams(self, hparams: dict[str, Any]) -> None:
        """Refuse a checkpoint whose own hyperparameters describe another network."""
        self.check_fits(self.skeleton(hparams), "its hyperparameters")

    def skeleton(self, model: Any, num_classes: int | None = None) -> Any:
        """The training module with ``model``'s arguments (a config's ``model`` section or
        a checkpoint's hyperparameters, in either layout) on the meta device: its shapes,
        without memory. ``num_classes``, when given, replaces the class count and names."""
        if hasattr(model, "model"):
            model = model.model
        hparams = nest_flat_hparams(model.as_dict() if hasattr(model, "as_dict")
                                    else dict(model))
        # Files and compilation play no part here.
        hparams["net"] = {**(hparams.get("net") or {}), "pretrained": False}
        hparams["runtime"] = {**(hparams.get("runtime") or {}), "init_from": None,
                              "reinit_heads": False, "compile": False}
        if num_classes is not None:
            hparams["net"]["num_classes"] = num_classes
            hparams["classes"] = None
        try:
            with torch.device("meta"):
                return CRASMRAModule.from_hparams(hparams)
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{self.path} describes a network that cannot be built "
                f"({' '.join(str(err).split())}); use the checkpoint as `crasmra fit` "
                "wrote it."
            ) from err

    def check_fits(self, module: Any, what: str) -> None:
        """Refuse the checkpoint unless its tensors have ``module``'s keys and shapes.

        Args:
            module: The network the run would build (see :meth:`skeleton`).
            what: What describes that network, for the message ("the options").

        Raises:
            CheckpointError: A weight is missing, unexpected or of another shape.
        """
        shapes = self.shapes or {}
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        wrong = [(k, shapes[k], v) for k, v in expected.items()
                 if k in shapes and shapes[k] != v]
        if not (missing or unexpected or wrong):
            return
        if wrong:
            key, got, want = wrong[0]
            detail = (f"{len(wrong)} weight(s) of another shape (first: {key} is {got} in the "
                      f"file, {want} in the network)")
        else:
            detail = (f"{len(missing)} weight(s) missing (first: {missing[:2]}) and "
                      f"{len(unexpected)} unexpected (first: {unexpected[:2]})")
        raise CheckpointError(
            f"--ckpt_path {self.path} does not fit the network {what} describe: "
            f"{detail}. Pass the options the checkpoint was trained with (or none, for "
            "`test`/`validate`), or use the checkpoint as `crasmra fit` wrote it."
        )
