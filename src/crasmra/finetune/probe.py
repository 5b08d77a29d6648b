"""Multinomial logistic regression on features (a linear probe), and a head's classifier
started from it (``--model.finetune.head_init probe``).

The fit is full-batch L-BFGS in float64 from zero weights: a convex problem from a fixed start,
so the same features give the same classifier on any machine. ``benchmarks/ncm_probe.py``
uses the same code for the linear-probe anchor, so the network's probe start and the anchor
are one method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crasmra.data.base import stratified_split

__all__ = [
    "DECAY_GRID",
    "FALLBACK_DECAY",
    "HOLDOUT_FRACTION",
    "PROBE_MAX_ITER",
    "DecayChoice",
    "Probe",
    "fit_logreg",
    "probe_linear",
    "select_decay",
]

#: Weight decays tried on a hold-out of the training features.
DECAY_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: The decay used when no stratified hold-out of the training features exists.
FALLBACK_DECAY = 1e-3
#: The share of each class's training photos held out to choose the decay.
HOLDOUT_FRACTION = 0.2
#: L-BFGS iterations at most per fit.
PROBE_MAX_ITER = 500


@dataclass(frozen=True)
class Probe:
    """A fitted multinomial logistic regression.

    Attributes:
        weight: (K, D) weights.
        bias: (K,) biases.
        iterations: L-BFGS iterations run (``max_iter``: stopped by the cap).
        normalize: Whether the features are L2-normalised before the weights apply.
    """

    weight: Tensor
    bias: Tensor
    iterations: int = 0
    normalize: bool = True

    def _inputs(self, x: Tensor) -> Tensor:
        return F.normalize(x.double(), dim=1) if self.normalize else x.double()

    def logits(self, x: Tensor) -> Tensor:
        """(N, K) logits of the features ``x`` (N, D)."""
        return self._inputs(x) @ self.weight.T + self.bias

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Top-1 accuracy on ``x`` with labels ``y``."""
        return float((self.logits(x).argmax(dim=1) == y).double().mean())

    def loss(self, x: Tensor, y: Tensor) -> float:
        """Mean cross-entropy on ``x`` with labels ``y``."""
        return float(F.cross_entropy(self.logits(x), y))


def fit_logreg(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    weight_decay: float,
    *,
    max_iter: int = PROBE_MAX_ITER,
    normalize: bool = True,
    bias: bool = True,
) -> Probe:
    """Multinomial logistic regression on ``x`` (L2-normalised first), by full-batch L-BFGS.

    Minimises ``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not decayed) from zero
    weights in float64: a convex problem from a fixed start, so the fit is deterministic.

    Args:
        x: Features ``(N, D)`` (normalised here).
        y: Labels ``(N,)`` in ``[0, num_classes)``.
        num_classes: Number of outputs ``K``.
        weight_decay: L2 penalty on the weights, >= 0.
        max_iter: L-BFGS iterations at most.
        normalize: L2-normalise the features first (the anchor's probe); False fits a
            classifier that is linear in ``x``.
        bias: Fit a bias per class; False keeps it at zero, so that on normalised features
            the classifier's argmax does not depend on a feature's norm.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    feats = F.normalize(x.double(), dim=1) if normalize else x.double()
    weight = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, requires_grad=True)
    bias_ = torch.zeros(num_classes, dtype=torch.float64, requires_grad=bias)
    optimizer = torch.optim.LBFGS(
        [weight, bias_] if bias else [weight],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(feats @ weight.T + bias_, y)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    return Probe(weight.detach(), bias_.detach(), iterations, normalize)


@dataclass(frozen=True)
class DecayChoice:
    """The probe's weight decay and how it was chosen.

    Attributes:
        decay: The chosen decay.
        selection: ``"holdout"`` (chosen on a hold-out of the training features) or
            ``"fixed"`` (no hold-out was possible: ``reason`` says why).
        holdout_accuracy: ``{decay: hold-out accuracy}`` of every candidate (holdout only).
        holdout_loss: ``{decay: hold-out cross-entropy}`` of every candidate (holdout only).
        holdout_images: Size of the hold-out (0 when fixed).
        reason: Why the decay was fixed, or "".
    """

    decay: float
    selection: str
    holdout_accuracy: dict[float, float] | None = None
    holdout_loss: dict[float, float] | None = None
    holdout_images: int = 0
    reason: str = ""


def select_decay(
    train: Tensor,
    train_y: Tensor,
    num_classes: int,
    decays: Sequence[float] = DECAY_GRID,
    *,
    holdout_fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
    fallback_decay: float = FALLBACK_DECAY,
    max_iter: int = PROBE_MAX_ITER,
    normalize: bool = True,
    bias: bool = True,
) -> DecayChoice:
    """Choose the probe's weight decay on a seeded stratified hold-out of the TRAINING features.

    Takes training features only. Each class sends ``round(n * holdout_fraction)`` (at least
    one) of its photos to the hold-out (:func:`crasmra.data.base.stratified_split`); the probe
    is fitted on the rest with each decay, and the best hold-out accuracy wins (ties: the lower
    hold-out cross-entropy, then the smaller decay). When some class has a single training
    photo no stratified hold-out exists and ``fallback_decay`` is returned as ``"fixed"``.
    ``normalize`` and ``bias`` are passed to :func:`fit_logreg`.
    """
    if not decays:
        raise ValueError("decays must list at least one weight decay")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    counts = torch.bincount(train_y, minlength=num_classes)
    present = counts[counts > 0]
    if len(decays) == 1:
        return DecayChoice(float(decays[0]), "fixed", reason="one decay given")
    if int(present.min()) < 2:
        single = int((present == 1).sum())
        return DecayChoice(
            float(fallback_decay),
            "fixed",
            reason=f"{single} class(es) have a single training photo, so no stratified "
            f"hold-out of the training features exists; fixed decay {fallback_decay:g}",
        )
    fit_idx, hold_idx = stratified_split(train_y.tolist(), holdout_fraction, seed)
    fit_idx_t, hold_idx_t = torch.tensor(fit_idx), torch.tensor(hold_idx)
    x_fit, y_fit = train[fit_idx_t], train_y[fit_idx_t]
    x_hold, y_hold = train[hold_idx_t], train_y[hold_idx_t]
    accuracy: dict[float, float] = {}
    loss: dict[float, float] = {}
    for decay in decays:
        probe = fit_logreg(x_fit, y_fit, num_classes, float(decay), max_iter=max_iter,
                           normalize=normalize, bias=bias)
        accuracy[float(decay)] = probe.accuracy(x_hold, y_hold)
        loss[float(decay)] = probe.loss(x_hold, y_hold)
    best = min(accuracy, key=lambda d: (-accuracy[d], loss[d], d))
    return DecayChoice(best, "holdout", accuracy, loss, len(hold_idx))




@torch.no_grad()
def probe_linear(
    layer: nn.Linear,
    features: Tensor,
    labels: Tensor,
    center: Tensor,
    norm: float,
    *,
    decays: Sequence[float] = DECAY_GRID,
    seed: int = 0,
) -> tuple[Probe, DecayChoice]:
    """Make ``layer`` the logistic regression of its own input features (a linear probe).

    The probe is fitted, without a bias, on the centred features L2-normalised one by one,
    ``x = (h - center) / ||h - center||``: as the anchors' probe and the imprinted (cosine)
    classifier, it compares directions, which is what generalises from one or two photos per
    class. The layer computes ``W' (h - center) / norm``: for every feature the anchors'
    logits ``W' x`` scaled by ``||h - center|| / norm`` (1 for a feature of average norm), so
    its argmax is the probe's. The decay is chosen on a seeded stratified hold-out of these
    training features (:func:`select_decay`).

    Args:
        layer: A (K, D) linear layer.
        features: (N, D) its inputs on the training images.
        labels: (N,) their classes in ``[0, K)``.
        center: (D,) subtracted from every feature.
        norm: Divides the weights (> 0; e.g. the centred features' mean norm), so that the
            logits of a feature of that norm are the probe's.
        decays: The weight decays to choose from.
        seed: Seed of the hold-out split.

    Returns:
        The probe (on the centred, normalised features) and how its decay was chosen.
    """
    if not norm > 0:
        raise ValueError(f"norm must be > 0, got {norm}")
    if layer.bias is None:
        raise ValueError("head_init 'probe' needs classifiers with a bias; use "
                         "--model.finetune.head_init imprint.")
    num_classes = layer.out_features
    x = F.normalize(features.double() - center.double(), dim=1)  # (N, D), unit norm
    choice = select_decay(x, labels, num_classes, decays, seed=seed, normalize=False,
                          bias=False)
    probe = fit_logreg(x, labels, num_classes, choice.decay, normalize=False, bias=False)
    weight = probe.weight / norm  # (K, D)
    layer.weight.copy_(weight.to(layer.weight))
    layer.bias.copy_((-(weight @ center.double())).to(layer.bias))
    return probe, choice
