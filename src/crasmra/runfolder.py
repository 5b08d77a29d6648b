"""The run folder: checks before a run writes into it, and what an earlier run left there.

A run folder (``--trainer.default_root_dir``) holds one run's checkpoints, metrics and logs.
Nothing here imports torch or Lightning at import time.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from crasmra import files
from crasmra.errors import UsageError

__all__ = [
    "CONFIG_FILE",
    "MIN_FREE_BYTES",
    "check_free_space",
    "checkpoint_size_estimate",
    "clear_earlier_run",
    "create_run_folder",
    "default_loggers",
    "drop_rows_from_step",
    "earlier_run_files",
    "keep_existing_csv",
    "read_data_section",
    "refuse_earlier_run",
]

log = logging.getLogger("crasmra")


def create_run_folder(folder: Path, flag: str = "--trainer.default_root_dir") -> None:
    """Create the run folder ``folder`` (named by ``flag``), or fail before any work when it
    cannot be written; see :func:`crasmra.files.check_writable`."""
    files.check_writable(folder, flag, folder=True)
    folder.mkdir(parents=True, exist_ok=True)


#: The resolved configuration a run saves in its folder, beside ``checkpoints/``.
CONFIG_FILE = "config.yaml"


def read_data_section(checkpoint: str | Path) -> tuple[dict[str, Any] | None, Path]:
    """The ``data`` section of the run folder's configuration of a checkpoint.

    ``<run>/checkpoints/best.ckpt`` -> ``<run>/config.yaml``. An unreadable file is logged and
    read as absent; the values are not checked here.

    Returns:
        The section when the file has one naming a dataset (else None), and the file's path.
    """
    import yaml

    from crasmra.config import load_yaml

    config_file = Path(checkpoint).resolve().parent.parent / CONFIG_FILE
    if not config_file.is_file():
        return None, config_file
    try:
        config = load_yaml(config_file.read_text(), str(config_file))
    except yaml.YAMLError as err:
        log.warning("Cannot read %s: %s", config_file, err)
        return None, config_file
    data = config.get("data") if isinstance(config, dict) else None
    return (data if isinstance(data, dict) and "dataset" in data else None), config_file


#: Free space kept on top of the checkpoints' estimate, for logs, metrics and the filesystem.
MIN_FREE_BYTES = 64 * 2**20


def checkpoint_size_estimate(model: Any) -> int:
    """Bytes of one training checkpoint of ``model``: weights and buffers, plus SGD momentum."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + momentum


def check_free_space(folder: Path, model: Any) -> None:
    """Fail before training when ``folder`` cannot hold two checkpoints.

    Two, because ``best.ckpt`` and ``last.ckpt`` coexist and each is written next to the
    file it replaces before the rename. Finding out at the end of the first epoch, hours in,
    would waste the epoch.
    """
    needed = 2 * checkpoint_size_estimate(model) + MIN_FREE_BYTES
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UsageError(
            f"Not enough free disk space in {folder}: {free / 2**20:.0f} MiB free, about "
            f"{needed / 2**20:.0f} MiB needed for two checkpoints of this model. Free some space "
            "or choose another --trainer.default_root_dir."
        )


def earlier_run_files(root: Path) -> list[Path]:
    """The checkpoints and metrics files an earlier ``fit`` left in ``root``."""
    checkpoints = root / "checkpoints"
    earlier = sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
    return earlier + [p for p in (root / "metrics.csv", root / "metrics.json") if p.is_file()]


def refuse_earlier_run(root: Path) -> None:
    """Fail when ``root`` holds another run's results, which a fresh ``fit`` would replace."""
    earlier = earlier_run_files(root)
    if earlier:
        raise UsageError(
            f"{root} already holds an earlier run ({', '.join(p.name for p in earlier[:3])}). "
            "Resume it with --ckpt_path last, choose another --trainer.default_root_dir, or "
            "pass --overwrite true to replace it."
        )


def clear_earlier_run(root: Path) -> None:
    """Delete what an earlier run left in ``root`` (``--overwrite true``), so none of it mixes
    with the new run's files (Lightning would otherwise write ``best-v1.ckpt`` beside them)."""
    earlier = earlier_run_files(root)
    for path in earlier:
        path.unlink()
    for folder in ("tensorboard", "test", "validate"):
        shutil.rmtree(root / folder, ignore_errors=True)
    if earlier:
        log.info("--overwrite: replaced the earlier run in %s", root)


def default_loggers(
    root: str | Path, append: bool = False, resume_step: int | None = None
) -> list[Any]:
    """CSV metrics in ``root/metrics.csv`` plus TensorBoard in ``root/tensorboard`` if installed.

    Args:
        root: The folder to log into.
        append: Keep the rows of an existing ``metrics.csv`` (a resumed run) instead of
            starting the file afresh.
        resume_step: The global step of the checkpoint a run resumes from: rows logged at
            this step or later are dropped, because the resumed run logs them again.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv_logger = CSVLogger(save_dir=str(root), name="", version="")
    if append:
        if resume_step is not None:
            drop_rows_from_step(Path(root) / "metrics.csv", resume_step)
        keep_existing_csv(csv_logger)
    loggers: list[Any] = [csv_logger]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.debug("tensorboard is not installed; logging to CSV only")
    else:
        loggers.append(
            TensorBoardLogger(
                save_dir=str(root), name="tensorboard", version="", default_hp_metric=False
            )
        )
    return loggers


def drop_rows_from_step(path: Path, step: int) -> None:
    """Remove the rows of ``path`` logged at ``step`` or later, atomically.

    A run killed after logging an epoch but before its checkpoint was saved resumes from the
    checkpoint before: without this, that epoch's rows would appear twice.
    """
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    column = rows[0].index("step")

    def keep(row: list[str]) -> bool:
        try:
            return int(row[column]) < step
        except (IndexError, ValueError):
            return True

    kept = [rows[0], *[row for row in rows[1:] if keep(row)]]
    if len(kept) == len(rows):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)
    log.info("Resuming at step %d: dropped %d later row(s) of %s", step,
             len(rows) - len(kept), path)


def keep_existing_csv(logger: Any) -> None:
    """Make a CSVLogger append to its ``metrics.csv`` rather than delete it at start.

    Lightning's CSV writer deletes an existing metrics file when its folder is not empty; its
    own appending path (which merges new columns into the header) is what a resumed run needs.
    """
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _AppendingWriter(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            super().__init__(log_dir)
            # Start from the existing header, so that rows written before keep their columns
            # when new ones are merged in.
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

        def _check_log_dir_exists(self) -> None:
            pass

    from crasmra.lightning_private import replace_csv_writer

    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    replace_csv_writer(logger, _AppendingWriter(log_dir=logger.log_dir))
