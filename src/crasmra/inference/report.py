"""The figures of ``crasmra report``: accuracy of every head, per-class accuracy, confused
pairs and calibration, computed from an evaluation's probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crasmra.checkpoint import CheckpointError
from crasmra.inference.evaluation import EvalOutputs
from crasmra.metric_names import COMBINED
from crasmra.metrics import calibration, confusion_matrix, top_k_accuracy

__all__ = [
    "MAX_REPORT_BYTES",
    "MAX_REPORT_CLASSES",
    "check_report_size",
    "compute_report",
    "expected_calibration_error",
]


#: The most classes ``crasmra report`` takes: it writes the K x K confusion matrix into
#: ``report.json`` and draws it, which for K = 1,000 is a million cells (8 MB in memory,
#: about 10 MB of JSON) and beyond that unreadable anyway. ``crasmra test`` has no such limit.
MAX_REPORT_CLASSES = 1_000
#: The most memory the per-head probabilities of a report may take (images x classes x
#: (heads + combined) x 4 bytes), checked before any image is read.
MAX_REPORT_BYTES = 2 * 2**30


def check_report_size(num_images: int, num_classes: int, num_heads: int) -> None:
    """Refuse a report whose confusion matrix or probabilities would be too large, before
    anything is allocated for them (see :data:`MAX_REPORT_CLASSES`, :data:`MAX_REPORT_BYTES`).

    Raises:
        CheckpointError: More than :data:`MAX_REPORT_CLASSES` classes (the checkpoint sets it).
        ValueError: The split's probabilities would take more than :data:`MAX_REPORT_BYTES`.
    """
    if num_classes > MAX_REPORT_CLASSES:
        raise CheckpointError(
            f"crasmra report handles at most {MAX_REPORT_CLASSES:,} classes (it writes and "
            f"draws the K x K confusion matrix); this model has {num_classes:,}. Use `crasmra "
            "test --ckpt_path CHECKPOINT` for its accuracies."
        )
    needed = num_images * num_classes * (num_heads + 1) * 4 + num_classes**2 * 8
    if needed > MAX_REPORT_BYTES:
        raise ValueError(
            f"A report of {num_images:,} images x {num_classes:,} classes would hold "
            f"{needed / 2**30:.1f} GiB of probabilities, more than crasmra report's "
            f"{MAX_REPORT_BYTES / 2**30:.0f} GiB; evaluate a smaller split, or use `crasmra "
            "test --ckpt_path CHECKPOINT`, which keeps no per-image probabilities."
        )


def expected_calibration_error(
    probs: Tensor | np.ndarray, targets: Tensor | np.ndarray, n_bins: int = 15
) -> dict[str, Any]:
    """Expected calibration error of the top-1 confidence, with equal-width bins.

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over ``n_bins`` bins of (0, 1],
    computed by torchmetrics' ``MulticlassCalibrationError(norm="l1")``, with each bin's
    figures for the reliability diagram.

    Returns:
        ``{"ece", "n_bins", "bins": [{"lower", "upper", "count", "accuracy", "confidence"}]}``;
        empty bins have ``accuracy`` and ``confidence`` None.
    """
    if n_bins < 1:
        raise ValueError(f"the number of calibration bins must be >= 1, got {n_bins}.")
    return calibration(torch.as_tensor(probs), torch.as_tensor(targets), n_bins)


def compute_report(
    outputs: EvalOutputs,
    classes: Sequence[str],
    *,
    n_bins: int = 15,
    top_confused: int = 10,
) -> dict[str, Any]:
    """Accuracy of every head, per-class accuracy, confused pairs and calibration.

    Per-class accuracy, the confusion matrix, confused pairs and calibration are those of the
    combined prediction. Top-5 is None for fewer than five classes (undefined, as in training).

    Returns:
        A JSON-ready dictionary (see ``report.json``).
    """
    num_classes = len(classes)
    targets = outputs.targets
    heads = {}
    for name in outputs.head_names:
        p = outputs.probs[name]
        heads[name] = {
            "top1": top_k_accuracy(p, targets, 1),
            "top5": top_k_accuracy(p, targets, 5) if num_classes >= 5 else None,
        }
    confusion = confusion_matrix(outputs.probs[COMBINED], targets)  # (K, K), rows: true class
    support = confusion.sum(dim=1)
    per_class = [
        {
            "index": i,
            "label": classes[i],
            "support": int(support[i]),
            "correct": int(confusion[i, i]),
            "accuracy": float(confusion[i, i] / support[i]) if support[i] else None,
        }
        for i in range(num_classes)
    ]
    off = confusion.clone()
    off.fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True, stable=True)
    pairs = []
    for flat in order[:top_confused].tolist():
        true, pred = divmod(flat, num_classes)
        count = int(off[true, pred])
        if count == 0:
            break
        pairs.append({
            "true": classes[true], "predicted": classes[pred],
            "true_index": true, "predicted_index": pred,
            "count": count, "rate": count / int(support[true]),
        })
    return {
        "num_images": len(targets),
        "num_skipped": len(outputs.skipped),
        "skipped": list(outputs.skipped),
        "num_classes": num_classes,
        "heads": heads,
        "per_class": per_class,
        "confused_pairs": pairs,
        "calibration": expected_calibration_error(outputs.probs[COMBINED], targets, n_bins),
        "confusion_matrix": confusion.tolist(),
    }
