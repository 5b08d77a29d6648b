"""The probe's regularisation kept while the classifiers train
(``--model.finetune.keep_probe_decay``)."""

from __future__ import annotations

import logging

import torch

from crasmra.engine.schedule import CLASSIFIER_GROUP
from crasmra.finetune import ImprintReport
from crasmra.losses import LossWeights
from crasmra.model import Network
from crasmra.outputs import PLAIN_HEAD

__all__ = ["carry_probe_decay", "head_loss_weights"]

log = logging.getLogger(__name__)


def head_loss_weights(net: Network, loss: LossWeights) -> dict[str, float]:
    """The weight of each head's cross-entropy in the training loss: ``alpha`` for the stage
    heads, ``beta`` for the concat head, 1 for ``plain``'s one classifier (SPEC)."""
    return {
        name: 1.0 if name == PLAIN_HEAD else loss.alpha if name in net.stage_names else loss.beta
        for name in net.head_names
    }


def carry_probe_decay(
    optimizer: torch.optim.Optimizer,
    net: Network,
    report: ImprintReport,
    loss: LossWeights,
) -> dict[str, float]:
    """Set each classifier's weight decay to the one its probe chose, in the layer's scale.

    The probe minimised ``CE + decay / 2 * ||W'||^2`` over features scaled by ``1 / norm``,
    so on the layer's own weights ``W = W' / norm`` the same objective is
    ``CE + decay * norm**2 / 2 * ||W||^2``. In the training loss the head's cross-entropy
    carries the weight ``w`` (``alpha``, ``beta`` or 1), so SGD's ``weight_decay`` that keeps
    the probe's optimum is ``w * decay * norm**2``.

    Args:
        optimizer: Built with ``split_classifiers=True`` (groups ``classifier/<head>``).
        net: The network.
        report: What imprinting did; heads without a probe keep their decay.
        loss: The loss weights.

    Returns:
        The weight decay set, by head.
    """
    weights = head_loss_weights(net, loss)
    applied: dict[str, float] = {}
    for group in optimizer.param_groups:
        name = str(group.get("name", ""))
        head = name.removeprefix(CLASSIFIER_GROUP)
        if name.startswith(CLASSIFIER_GROUP) and head in report.probe_decay:
            decay = weights[head] * report.probe_decay[head] * report.probe_norm[head] ** 2
            group["weight_decay"] = decay
            applied[head] = decay
    if applied:
        log.info("The classifiers keep their probes' weight decay while they train: %s.",
                 ", ".join(f"{head} {decay:.3g}" for head, decay in applied.items()))
    return applied
