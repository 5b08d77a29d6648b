"""Classification metrics, computed with torchmetrics, for training and for reports alike.

The training engine logs :func:`accuracy_metrics` on every validation and test pass, and
``crasmra report`` computes its figures with :func:`top_k_accuracy`, :func:`confusion_matrix`
and :func:`calibration`: one definition of top-k accuracy serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

__all__ = [
    "accuracy_metrics",
    "calibration",
    "calibration_bins",
    "confusion_matrix",
    "top_k_accuracy",
]


def accuracy_metrics(head_names: Sequence[str], num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 (and top-5 from five classes on) accuracy of every head, as ``{prefix}{head}_top1``.

    Top-5 is undefined for fewer than five classes and left out then.
    """
    metrics: dict[str, Any] = {}
    for head in head_names:
        metrics[f"{head}_top1"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        if num_classes >= 5:
            metrics[f"{head}_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def top_k_accuracy(probs: Tensor, targets: Tensor, k: int) -> float:
    """Micro-averaged top-``k`` accuracy of (N, K) scores."""
    metric = MulticlassAccuracy(probs.shape[1], top_k=k, average="micro")
    return float(metric(probs.float(), targets))


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int) -> list[dict[str, Any]]:
    """Per-bin count, accuracy and mean confidence of the top-1 confidence, for a reliability
    diagram; equal-width bins ``(lower, upper]`` as torchmetrics' calibration error uses."""
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to bin 0.
    which = torch.bucketize(confidence, edges[1:-1], right=False)
    bins = []
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        bins.append({
            "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
            "accuracy": float(correct[mask].mean()) if count else None,
            "confidence": float(confidence[mask].mean()) if count else None,
        })
    return bins


def confusion_matrix(probs: Tensor, targets: Tensor) -> Tensor:
    """(K, K) long counts of (N, K) scores' top-1 predictions; rows are the true class."""
    return MulticlassConfusionMatrix(probs.shape[1])(probs.float(), targets).long()


def calibration(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error of the top-1 confidence, and the bins it sums over.

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over ``n_bins`` equal-width bins
    of (0, 1], computed by torchmetrics' ``MulticlassCalibrationError(norm="l1")``.

    Returns:
        ``{"ece", "n_bins", "bins"}`` (see :func:`calibration_bins`).
    """
    probs = probs.float()
    ece = MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")(probs, targets)
    return {"ece": float(ece), "n_bins": n_bins, "bins": calibration_bins(probs, targets, n_bins)}
