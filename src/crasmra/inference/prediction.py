"""Classify image files with the combined prediction."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crasmra.inference.device import run_network
from crasmra.inference.inputs import (
    Failure,
    ImageFiles,
    collate_good,
    find_images,
    ordered_loader,
)
from crasmra.model import Network

__all__ = ["Prediction", "PredictionResult", "ProgressFn", "predict"]

log = logging.getLogger(__name__)

#: ``progress(done, total)``, called after every batch.
ProgressFn = Callable[[int, int], None]


@dataclass
class Prediction:
    """Top-k classes of one image (combined prediction), most probable first."""

    path: str
    indices: list[int]
    labels: list[str]
    probabilities: list[float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"path", "top_k": [{"rank", "index", "label", "probability"}]}``."""
        return {
            "path": self.path,
            "top_k": [
                {"rank": r + 1, "index": i, "label": lab, "probability": p}
                for r, (i, lab, p) in enumerate(
                    zip(self.indices, self.labels, self.probabilities, strict=True))
            ],
        }


@dataclass
class PredictionResult:
    """What :func:`predict` returns: predictions in input order, and the skipped inputs."""

    predictions: list[Prediction] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)



def predict(
    model: Network,
    inputs: Iterable[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> PredictionResult:
    """Classify image files with the combined prediction (mean of the heads' softmaxes).

    Unreadable files and inputs that match nothing are reported in ``failures`` (and
    logged) and skipped; they never stop the batch.

    Args:
        model: A network from :func:`load_model` (uses its ``transform`` and ``classes``).
        inputs: Files, folders and glob patterns (see :func:`find_images`).
        top_k: Classes per image (capped at the number of classes).
        batch_size: Images per forward pass.
        num_workers: DataLoader processes decoding images (0: in this process).
        progress: Called as ``progress(files_done, files_total)`` after every batch.

    Returns:
        Predictions in input order and the failures.
    """
    if top_k < 1:
        raise ValueError(f"top-k must be >= 1, got {top_k}.")
    files, failures = find_images(inputs)
    result = PredictionResult(failures=list(failures))
    k = min(top_k, model.num_classes)
    loader = ordered_loader(ImageFiles(files, model.transform), batch_size, num_workers,
                            collate_good)
    by_index: dict[int, Prediction] = {}
    done = 0
    model.eval()
    for batch in loader:
        for index, reason in batch["errors"]:
            log.debug("Skipping %s: %s", files[index], reason)
            result.failures.append(Failure(str(files[index]), reason))
        if batch["images"] is not None:
            with torch.inference_mode():
                probs = run_network(model, batch["images"]).probs
            values, indices = probs.topk(k, dim=1)
            for row, index in enumerate(batch["indices"]):
                idx = indices[row].tolist()
                by_index[index] = Prediction(
                    path=str(files[index]),
                    indices=idx,
                    labels=[model.classes[i] for i in idx],
                    probabilities=[float(p) for p in values[row]],
                )
        done += len(batch["indices"]) + len(batch["errors"])
        if progress is not None:
            progress(done, len(files))
    result.predictions = [by_index[i] for i in sorted(by_index)]
    return result
