"""The values of the fine-tuning switches (``--model.finetune.*``)."""

from __future__ import annotations

__all__ = [
    "COMBINES",
    "CRAM_INITS",
    "CRAM_SUPPRESSIONS",
    "HEAD_INITS",
    "HEAD_PATH_DIRECTIONS",
    "HEAD_PATH_INITS",
    "IMPRINT_TRANSFORMS",
]

#: ``--model.finetune.head_init`` values: PyTorch's default initialisation, weight imprinting,
#: or imprinting followed by a logistic-regression fit of every classifier (a linear probe).
HEAD_INITS: tuple[str, ...] = ("random", "imprint", "probe")
#: ``--model.finetune.head_path_init`` values: PyTorch's initialisation of the projection and the
#: heads' hidden layers, or the identity on the training images' features (:func:`init_head_paths`).
HEAD_PATH_INITS: tuple[str, ...] = ("random", "identity")
#: ``--model.finetune.head_path_directions`` values: what the identity head paths keep of each
#: stage's features, the class means' span alone, or that span then the leading principal
#: directions of the rest.
HEAD_PATH_DIRECTIONS: tuple[str, ...] = ("class_means", "principal")
#: ``--model.finetune.combine`` values: the paper's mean of the softmaxes, or fitted head weights.
COMBINES: tuple[str, ...] = ("mean", "fitted")
#: ``--model.finetune.imprint_transform`` values: the view of the training images that the heads
#: are imprinted from, the training transform's or the evaluation transform's.
IMPRINT_TRANSFORMS: tuple[str, ...] = ("train", "eval")
#: ``--model.finetune.cram_init`` values: PyTorch's initialisation of CRAM's importance MLP, its
#: last layer scaled down so that every channel starts at nearly the same importance, or the
#: latter only where CRAM does not train (below ``probe_below``).
CRAM_INITS: tuple[str, ...] = ("random", "neutral", "auto")
#: ``--model.finetune.cram_suppression`` values: CRAM's mask damps its top channels by ``omega``
#: in every run (the paper's), or only where CRAM trains (omega 1 below ``probe_below``).
CRAM_SUPPRESSIONS: tuple[str, ...] = ("always", "trained")
