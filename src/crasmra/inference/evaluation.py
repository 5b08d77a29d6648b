"""Evaluate a dataset split: every head's probabilities, with the labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from crasmra.checkpoint import check_data_settings, load_checkpoint_file
from crasmra.data import ImageLoadError, create_dataset
from crasmra.inference.device import run_network
from crasmra.inference.inputs import ordered_loader
from crasmra.inference.prediction import ProgressFn
from crasmra.metric_names import COMBINED
from crasmra.model import Network
from crasmra.runfolder import read_data_section

__all__ = [
    "COMBINED",
    "DATA_KEYS",
    "EvalOutputs",
    "build_eval_dataset",
    "evaluate",
    "run_dataset_config",
]

log = logging.getLogger(__name__)

#: Keys of a data-module configuration that select the evaluated images (the rest, such as
#: batch size or workers, only affect loading speed).
DATA_KEYS = ("dataset", "root", "val_fraction", "split_seed", "options")


def run_dataset_config(checkpoint_path: str | Path) -> dict[str, Any] | None:
    """The data settings a checkpoint was trained with, if they can be found.

    Looks first in the checkpoint (Lightning stores the data module's hyperparameters under
    ``datamodule_hyper_parameters``), then in the run folder's resolved ``config.yaml``
    (``<run>/checkpoints/best.ckpt`` -> ``<run>/config.yaml``).

    Returns:
        ``{"dataset", "root", "val_fraction", "split_seed", "options"}`` (those present),
        or None when neither source has them.

    Raises:
        FileNotFoundError, CheckpointError: The checkpoint is missing or cannot be read.
    """
    path = Path(checkpoint_path)
    source: dict[str, Any] | None = None
    origin: Path = path
    if path.suffix != ".safetensors":
        # A file that cannot be read is reported as such: "records no dataset" would send the
        # user looking for the wrong problem.
        ckpt = load_checkpoint_file(path)
        hp = ckpt.get("datamodule_hyper_parameters")
        if isinstance(hp, dict) and "dataset" in hp:
            source = dict(hp)
    if source is None:
        data, config_file = read_data_section(path)
        if data is not None:
            source, origin = data, config_file
    if source is None:
        return None
    # Settings from a file are input like any other: checked as the command line checks them.
    checked = check_data_settings(source, origin)
    return {k: checked[k] for k in DATA_KEYS if checked.get(k) is not None}


def build_eval_dataset(
    model: Network, data: dict[str, Any], split: str = "test"
) -> Dataset:
    """One split of a dataset, transformed with the model's own eval transform.

    Args:
        model: A network from :func:`load_model`.
        data: ``{"dataset": name, "root": ..., "val_fraction": ..., "split_seed": ...,
            "options": {...}}``, e.g. from :func:`run_dataset_config`.
        split: "train", "val" or "test".
    """
    if "dataset" not in data:
        raise ValueError("No dataset given: pass --data NAME (and --root PATH).")
    options = dict(data.get("options") or {})
    kwargs = {k: data[k] for k in ("val_fraction", "split_seed") if k in data}
    # Bad images are reported by evaluate() and left out, not replaced by a neighbour (which
    # would count that neighbour twice).
    return create_dataset(data["dataset"], data.get("root"), split, transform=model.transform,
                          skip_bad_images=False, **kwargs, **options)


class _SafeItems(Dataset):
    """Dataset items as ``(image, label, index, error)``, with load errors carried, not raised."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int, str | None]:
        try:
            image, label = self.dataset[index]
        except ImageLoadError as err:
            return None, -1, index, f"{err.path}: {err.reason}"
        return image, int(label), index, None


def _collate_labelled(items: list[tuple[Tensor | None, int, int, str | None]]) -> dict[str, Any]:
    good = [(x, y) for x, y, _, _ in items if x is not None]
    return {
        "images": torch.stack([x for x, _ in good]) if good else None,
        "targets": torch.tensor([y for _, y in good], dtype=torch.long),
        "errors": [e for x, _, _, e in items if x is None],
    }


@dataclass
class EvalOutputs:
    """Per-head probabilities and the labels of an evaluated split.

    Attributes:
        head_names: The network's heads (stage heads and ``"concat"``, or plain's
            ``"classifier"``), then :data:`COMBINED`.
        probs: ``{head: (N, K) float32 probabilities}``.
        targets: (N,) labels.
        skipped: ``"path: reason"`` of every image left out because it could not be read.
    """

    head_names: tuple[str, ...]
    probs: dict[str, Tensor]
    targets: Tensor
    skipped: list[str] = field(default_factory=list)


@torch.inference_mode()
def evaluate(
    model: Network,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> EvalOutputs:
    """Run the network over a labelled dataset and collect every head's probabilities.

    Unreadable images are left out and listed in ``skipped``.
    """
    heads = (*model.head_names, COMBINED)
    chunks: dict[str, list[Tensor]] = {h: [] for h in heads}
    targets: list[Tensor] = []
    skipped: list[str] = []
    total, done = len(dataset), 0  # type: ignore[arg-type]
    model.eval()
    for batch in ordered_loader(_SafeItems(dataset), batch_size, num_workers, _collate_labelled):
        for error in batch["errors"]:
            log.debug("Skipping unreadable image %s", error)
        skipped.extend(batch["errors"])
        if batch["images"] is not None:
            out = run_network(model, batch["images"])
            for name, logits in zip(heads[:-1], out.logits, strict=True):
                chunks[name].append(logits.float().softmax(dim=1).cpu())
            chunks[COMBINED].append(out.probs.float().cpu())
            targets.append(batch["targets"])
        done += len(batch["targets"]) + len(batch["errors"])
        if progress is not None:
            progress(done, total)
    if not targets:
        raise ValueError(f"No image of the dataset could be read ({len(skipped)} skipped).")
    return EvalOutputs(
        head_names=heads,
        probs={h: torch.cat(c) for h, c in chunks.items()},
        targets=torch.cat(targets),
        skipped=skipped,
    )
