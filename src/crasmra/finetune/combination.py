"""Combination weights: how much each head counts in the combined prediction
(``--model.finetune.combine fitted``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fit_head_weights"]


def fit_head_weights(
    probs: dict[str, Tensor],
    labels: Tensor,
    iterations: int = 200,
    fallback: Sequence[float] | None = None,
) -> list[float]:
    """Mixture weights of the heads that maximise the likelihood of held-out predictions.

    The combined prediction ``sum_h w_h p_h`` is a mixture of the heads' softmaxes; its
    log-likelihood is concave in ``w`` on the simplex, and the EM update
    ``w_h <- mean_i w_h p_h(y_i | x_i) / sum_g w_g p_g(y_i | x_i)`` climbs to its maximum.
    Fitted on leave-one-out predictions (:class:`ImprintReport`), a head that separates
    the classes poorly gets a small weight.

    Args:
        probs: Per head, (M, K) probabilities of M held-out images (in head order).
        labels: (M,) their classes.
        iterations: EM steps.
        fallback: The weights when there is nothing to fit on (every class has a single
            image); None gives equal weights.

    Returns:
        One weight per head of ``probs``, in its order, summing to 1.
    """
    names = list(probs)
    if not names:
        return []
    if labels.numel() == 0:
        if fallback is not None:
            total = float(sum(fallback))
            return [float(w) / total for w in fallback]
        return [1.0 / len(names)] * len(names)
    rows = torch.arange(labels.numel())
    # (H, M): each head's probability of the true class, floored so that no image has none.
    likelihood = torch.stack([probs[n][rows, labels].double() for n in names]).clamp(min=1e-12)
    weights = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    for _ in range(iterations):
        joint = weights.unsqueeze(1) * likelihood  # (H, M)
        weights = (joint / joint.sum(dim=0, keepdim=True)).mean(dim=1)
    return [float(w) for w in weights / weights.sum()]
