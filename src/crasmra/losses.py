"""The CRA-SMRA training loss: tensors in, named parts out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from crasmra.layers import diversity_loss
from crasmra.outputs import PLAIN_HEAD, ModelOutput

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "SMRAM_VARIANTS",
    "CRASMRALoss",
    "LossWeights",
    "diversity_loss",
    "trains_with_smram",
]

#: The paper's loss weights (SPEC): the stage heads, the concat head, SMRAM's diversity term.
DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA = 2.0, 1.0, 1.0

#: The variants trained with SMRAM's diversity loss. SMRAM is a training device, so this is
#: the engine's choice, not the network's: ``"cram"`` and ``"cra-smra"`` build one network.
SMRAM_VARIANTS: tuple[str, ...] = ("cra-smra",)


def trains_with_smram(variant: str) -> bool:
    """Whether a run of ``variant`` adds SMRAM's diversity loss."""
    return variant in SMRAM_VARIANTS


@dataclass
class LossWeights:
    """The loss weights of the paper's objective (``--model.loss.*``); constructing one
    checks them.

    Attributes:
        alpha: Weight of the sum of the stage heads' cross-entropies (SPEC: 2).
        beta: Weight of the concatenated head's cross-entropy (SPEC: 1).
        gamma: Weight of SMRAM's diversity loss; only used by ``"cra-smra"`` (SPEC: 1).
    """

    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(
                    f"{name} must be a finite number >= 0, got {value!r}; change "
                    f"--model.loss.{name}."
                )


class CRASMRALoss(nn.Module):
    """``L = alpha * sum_i CE(y, p_i) + beta * CE(y, p_concat) + gamma * L_div`` (SPEC).

    For the ``"plain"`` variant (an output with ``classifier_logits``) the loss is the plain
    cross-entropy of its one classifier, unweighted: alpha and beta belong to the paper's heads.

    Args:
        alpha: Weight of the summed stage-head cross-entropies (paper: 2).
        beta: Weight of the concat head's cross-entropy (paper: 1).
        gamma: Weight of SMRAM's diversity loss (paper: 1); used only when ``div_loss`` is
            passed, i.e. for the ``"cra-smra"`` variant.
    """

    def __init__(
        self, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, gamma: float = DEFAULT_GAMMA
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)

    def forward(
        self, output: ModelOutput, target: Tensor, div_loss: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the total loss and its named parts.

        Args:
            output: The network's output.
            target: (B,) class indices.
            div_loss: SMRAM's scalar diversity loss, or None (variants without SMRAM).

        Returns:
            ``(total, parts)``. ``parts`` holds detached, unweighted terms for logging:
            ``"{stage_name}_ce"`` per stage head (e.g. ``"stage3_ce"``), ``"concat_ce"``, and
            ``"diversity"`` when ``div_loss`` is given; ``"classifier_ce"`` for plain.
        """
        if output.classifier_logits is not None:
            ce = F.cross_entropy(output.classifier_logits, target)
            parts = {f"{PLAIN_HEAD}_ce": ce.detach()}
            if div_loss is not None:
                parts["diversity"] = div_loss.detach()
                return ce + self.gamma * div_loss, parts
            return ce, parts
        names = output.stage_names or tuple(f"head{i}" for i in range(len(output.stage_logits)))
        stage_ce = [F.cross_entropy(logits, target) for logits in output.stage_logits]
        concat_ce = F.cross_entropy(output.concat_logits, target)
        total = self.alpha * sum(stage_ce) + self.beta * concat_ce
        parts = {f"{n}_ce": ce.detach() for n, ce in zip(names, stage_ce, strict=True)}
        parts["concat_ce"] = concat_ce.detach()
        if div_loss is not None:
            total = total + self.gamma * div_loss
            parts["diversity"] = div_loss.detach()
        return total, parts

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}"
