"""The options crasmra adds to LightningCLI's ``fit``, ``validate`` and ``test``, and the links
that carry the data's class list and transform into the model."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from crasmra.callbacks import ResumableCheckpoint
from crasmra.metric_names import MONITOR

__all__ = ["add_run_arguments"]


def _plain_image_size(size: Any) -> int | list[int] | None:
    """``--data.image_size`` as NetConfig.img_size takes it: an int or ``[h, w]``."""
    return size if size is None or isinstance(size, int) else [int(s) for s in size]


def add_run_arguments(parser: LightningArgumentParser) -> None:
    """Add ``--checkpoint.*``, ``--test_after_fit``, ``--threads`` and ``--overwrite`` to a
    subcommand's ``LightningArgumentParser``, and link the data module's values to the model."""
    # A ModelCheckpoint whose last.ckpt follows every epoch (see ResumableCheckpoint).
    parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
    parser.set_defaults(
        {
            "checkpoint.monitor": MONITOR,
            "checkpoint.mode": "max",
            "checkpoint.filename": "best",
            "checkpoint.save_last": True,
            "checkpoint.auto_insert_metric_name": False,
        }
    )
    parser.add_argument(
        "--test_after_fit",
        type=bool,
        default=True,
        help="After `fit`, evaluate best.ckpt on the test split: the best epoch by "
        "validation, or the final epoch when there is no validation split.",
    )
    parser.add_argument(
        "--threads",
        type=int | None,
        default=None,
        help="Intra-op CPU threads when training or evaluating on the CPU (default: "
        "chosen from the usable cores together with --data.num_workers so that they do "
        "not oversubscribe them; see BENCHMARKS.md).",
    )
    parser.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="Let `fit` start afresh in a run folder that holds an earlier run's "
        "checkpoints or metrics (they are replaced). Without it such a folder is refused.",
    )
    parser.link_arguments("model.net.backbone", "data.backbone", apply_on="parse")
    # A Transformer that timm builds for one input size is built for the crop size.
    parser.link_arguments("data.image_size", "model.net.img_size", apply_on="parse",
                          compute_fn=_plain_image_size)
    parser.link_arguments("data.num_classes", "model.net.num_classes", apply_on="instantiate")
    parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
    parser.link_arguments(
        "data.transform_config", "model.transform_config", apply_on="instantiate"
    )
