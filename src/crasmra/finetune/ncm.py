"""Nearest-class-mean arithmetic: centred class-mean directions, leave-one-out logits and
the logits' scale fitted to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FALLBACK_LOGIT_SCALE", "centred_directions", "fit_logit_scale",
           "leave_one_out_logits"]

#: The logits' scale when it cannot be fitted (every class has a single training image).
FALLBACK_LOGIT_SCALE = 10.0
#: Scales tried by :func:`fit_logit_scale` (log-spaced).
_SCALE_GRID = torch.logspace(-1, 2, 61)


def centred_directions(
    class_means: Tensor, center: Tensor, present: Tensor | None = None
) -> Tensor:
    """(K, D) unit vectors from ``center`` to each class mean; zero rows for absent classes.

    Args:
        class_means: (K, D) mean feature per class.
        center: (D,) the centre (the mean of the class means).
        present: (K,) bool, the classes that had samples; None: all.
    """
    directions = F.normalize(class_means - center, dim=1)
    if present is not None:
        directions = directions * present.unsqueeze(1).to(directions)
    return directions


def leave_one_out_logits(
    features: Tensor, labels: Tensor, sums: Tensor, counts: Tensor, center: Tensor
) -> tuple[Tensor, Tensor]:
    """Each image's unit-scale imprinted logits with its own class mean left out.

    The imprinted classifier classifies its own training images almost perfectly (each image
    pulls its class mean towards itself), so a scale fitted on them would be far too
    confident. With the image left out of its own class's mean, the logits are those of an
    unseen image of the class.

    Args:
        features: (N, D) features.
        labels: (N,) classes.
        sums: (K, D) per-class sums of the features.
        counts: (K,) images per class.
        center: (D,) the centre of the imprinted classifier.

    Returns:
        ``(logits, kept)``: (M, K) logits ``||h - c|| * cos(h - c, m_k - c)`` of the M images
        whose class has at least two images, and the (N,) bool mask of those images.
    """
    kept = counts[labels] >= 2
    h, y = features[kept], labels[kept]
    means = sums / counts.clamp(min=1).unsqueeze(1)
    directions = centred_directions(means, center, counts > 0)  # (K, D)
    centred = h - center
    logits = centred @ directions.T  # (M, K): ||h - c|| * cos
    own = (sums[y] - h) / (counts[y] - 1).unsqueeze(1)  # (M, D) own class mean without h
    own_direction = F.normalize(own - center, dim=1)
    logits[torch.arange(len(y)), y] = (centred * own_direction).sum(dim=1)
    return logits, kept


def fit_logit_scale(
    loo: tuple[Tensor, Tensor], labels: Tensor, mean_norm: float, fallback: float
) -> float:
    """The scale s minimising the cross-entropy of ``s * logits / mean_norm`` (a grid search).

    A calibrated head is the point: averaging softmaxes (the combined prediction) then gives a
    head as much say as its confidence is worth, and a weak head's flat softmax cannot
    outvote a strong one.

    Args:
        loo: :func:`leave_one_out_logits`.
        labels: (N,) classes of all images.
        mean_norm: The mean centred feature norm the imprinted weights divide by.
        fallback: Returned when no image has a left-out logit.
    """
    logits, kept = loo
    if logits.shape[0] == 0 or not mean_norm > 0:
        return float(fallback)
    y = labels[kept]
    losses = torch.stack([F.cross_entropy(s * logits / mean_norm, y) for s in _SCALE_GRID])
    return float(_SCALE_GRID[int(losses.argmin())])
