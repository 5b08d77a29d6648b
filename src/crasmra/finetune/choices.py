"""The values of the fine-tuning switches (``--model.finetune.*``)."""

from __future__ import annotations

__all__ = ["COMBINES", "HEAD_INITS", "HEAD_PATH_INITS"]

#: ``--model.finetune.head_init`` values: PyTorch's default initialisation, or weight imprinting.
HEAD_INITS: tuple[str, ...] = ("random", "imprint")
#: ``--model.finetune.head_path_init`` values: PyTorch's initialisation of the projection and the
#: heads' hidden layers, or the identity on the training images' features (:func:`init_head_paths`).
HEAD_PATH_INITS: tuple[str, ...] = ("random", "identity")
#: ``--model.finetune.combine`` values: the paper's mean of the softmaxes, or fitted head weights.
COMBINES: tuple[str, ...] = ("mean", "fitted")
