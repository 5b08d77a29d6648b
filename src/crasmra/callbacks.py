"""Lightning callbacks that make a run folder self-describing.

A run folder (``--trainer.default_root_dir``) holds the resolved ``config.yaml`` (written by
LightningCLI), ``run_info.json`` (package and library versions, git commit, command line),
``classes.txt``, ``metrics.csv`` (CSVLogger), ``metrics.json`` (the final figures) and
``checkpoints/{best,last}.ckpt``.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from crasmra._version import __version__
from crasmra.files import check_output, save_atomic, write_json, write_text
from crasmra.lightning_private import LastFollowsEverySave
from crasmra.metric_names import MONITOR

log = logging.getLogger(__name__)

#: Libraries whose versions are recorded in every run folder.
RECORDED_PACKAGES = ("torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy", "pillow")


def git_commit(cwd: str | Path | None = None) -> dict[str, Any] | None:
    """The git commit of ``cwd`` and whether its tree has uncommitted changes, if any."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        return done.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain") != ""}
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    """Versions of crasmra, Python and the main libraries, and the host platform."""
    versions: dict[str, str | None] = {"crasmra": __version__}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


class RunInfoCallback(L.Callback):
    """Write ``run_info.json`` and ``classes.txt`` into the run folder when fitting starts."""

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = Path(trainer.default_root_dir)
        info = {
            **environment_info(),
            "git": git_commit(),
            "command": sys.argv,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "precision": str(trainer.precision),
        }
        write_json(root / "run_info.json", info)
        classes = getattr(pl_module, "classes", None)
        if classes:
            # Atomic: a link named classes.txt is replaced, never written through.
            write_text(root / "classes.txt", "\n".join(classes) + "\n")


#: ``metrics.json``'s ``selection`` entry: how ``best.ckpt`` (the checkpoint tested after
#: ``fit``) was chosen.
SELECTION_BEST_VALIDATION = "best_validation"
SELECTION_FINAL_EPOCH = "final_epoch"


def selection_of(trainer: L.Trainer) -> dict[str, Any]:
    """How the trainer's checkpoint callback chooses ``best.ckpt``, as ``metrics.json`` records it.

    Returns:
        ``{"rule": "best_validation", "monitor": ..., "mode": ...}`` when it keeps the best
        epoch by a monitored metric, else ``{"rule": "final_epoch", "reason": ...}``.
    """
    ckpt = trainer.checkpoint_callback
    monitor = getattr(ckpt, "monitor", None)
    if monitor is not None:
        return {"rule": SELECTION_BEST_VALIDATION, "monitor": monitor, "mode": ckpt.mode}
    return {
        "rule": SELECTION_FINAL_EPOCH,
        "reason": "no validation split: best.ckpt holds the final epoch's weights, which the "
        "test after fit evaluates (nothing is selected on the test split)",
    }


def keep_final_epoch_without_validation(trainer: L.Trainer, has_validation: bool) -> bool:
    """Without validation, make ``best.ckpt`` the final epoch rather than leave it unwritten.

    A ``ModelCheckpoint`` that monitors a validation metric (``val/...``) would find no value
    when there is no validation split (``--data.val_fraction 0``, the paper's protocol) or
    ``limit_val_batches`` is 0: it would warn every epoch and never write ``best.ckpt``, and
    the test after ``fit`` would silently fall back to the in-memory weights. Such callbacks
    are switched to ``monitor=None``, under which Lightning keeps the latest epoch. Call it
    before ``trainer.fit``: the monitor is part of the callback's key in a checkpoint.

    Args:
        trainer: The trainer about to fit.
        has_validation: Whether the data has a validation split.

    Returns:
        True when the selection was switched to the final epoch.
    """
    if has_validation and trainer.limit_val_batches != 0:
        return False
    switched = False
    for ckpt in trainer.checkpoint_callbacks:
        monitor = getattr(ckpt, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith("val/"):
            ckpt.monitor = None
            switched = True
    if switched:
        log.info(
            "No validation split: best.ckpt is the final epoch, and the test after fit "
            "evaluates it (--data.val_fraction 0.1 holds out 10% of the training split to "
            "choose the best epoch instead)."
        )
    return switched


class MetricsFileCallback(L.Callback):
    """Keep ``metrics.json`` in the run folder up to date.

    A stand-alone ``validate`` or ``test`` writes into ``folder`` (its own subfolder) instead, so
    that evaluating never changes a training run's record nor blocks a later ``fit``.

    It holds the validation metrics of the best epoch (chosen like ModelCheckpoint does: the
    highest ``monitor`` value on the validation split, the first epoch on ties), the last
    validation metrics, how ``best.ckpt`` was chosen (``selection``, see :func:`selection_of`;
    without a validation split it is the final epoch), and the test metrics once a test has run.
    """

    def __init__(self, monitor: str = MONITOR) -> None:
        self.monitor = monitor
        self.best: dict[str, Any] | None = None
        self.folder: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")

    @staticmethod
    def _collect(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {
            k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(prefix)
        }

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(self.folder or trainer.default_root_dir) / "metrics.json"

    def _update(self, trainer: L.Trainer, **entries: Any) -> None:
        path = self._path(trainer)
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("Replacing unreadable %s", path)
        data.update(entries)
        write_json(path, data)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "validate":
            if trainer.is_global_zero:
                self._update(
                    trainer,
                    validate=self._collect(trainer, "val/"),
                    validate_checkpoint=trainer.ckpt_path,
                )
            return
        metrics = self._collect(trainer, "val/")
        score = metrics.get(self.monitor)
        if score is not None and (self.best is None or score > self.best["metrics"][self.monitor]):
            self.best = {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "metrics": metrics,
            }
        if trainer.is_global_zero:
            self._update(
                trainer,
                monitor=self.monitor,
                best_val=self.best,
                last_val={"epoch": trainer.current_epoch, "metrics": metrics},
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        self._update(
            trainer,
            selection=selection_of(trainer),
            best_checkpoint=getattr(ckpt, "best_model_path", None) or None,
            last_checkpoint=getattr(ckpt, "last_model_path", None) or None,
            epochs_completed=trainer.current_epoch,
            global_step=trainer.global_step,
        )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._update(
                trainer, test=self._collect(trainer, "test/"), test_checkpoint=trainer.ckpt_path
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer whose local files are never half-written.

    Lightning's own writer (``_atomic_save``) goes through an fsspec transaction that writes
    to ``tempfile.mkstemp()`` in the system temporary folder and then ``shutil.move``s it.
    When that folder is on another filesystem than the run folder (a tmpfs ``/tmp``, a
    scratch disk) the move is a copy onto the checkpoint's own name, so a ``kill -9`` during
    the copy leaves a truncated ``last.ckpt``; nothing is fsync'ed, and a killed write
    leaves a checkpoint-sized orphan in the temporary folder. This writer uses
    :func:`crasmra.files.save_atomic` instead: temporary file next to the checkpoint,
    ``fsync``, ``os.replace``. Remote paths (``s3://``...) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomic(checkpoint, path)


class SeededLoaderWorkers(L.Callback):
    """Make every training epoch draw its batches and augmentations from ``(seed, epoch)``
    alone, whether the run was interrupted or not, with or without loader workers.

    Two things would otherwise make a run resumed with ``--ckpt_path last`` train on other
    data than the run it continues, as soon as the loader has workers (the default):

    - On resuming, Lightning makes the training loader's iterator before it tells the sampler
      the epoch, and keeps it: the workers' first batches and their seeds were drawn for epoch
      0. At the start of such an epoch the iterator is made again, as Lightning does for every
      epoch of an uninterrupted run.
    - Persistent workers (the default) keep their random stream from one epoch to the next,
      which no checkpoint can hold: the training set is wrapped so that each worker reseeds at
      the start of every epoch as a fresh worker of that epoch would be seeded (see
      :class:`crasmra.data.sampling.EpochSeededDataset`).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from crasmra.data.sampling import EpochSeededDataset

        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        if stage == "fit" and dataset is not None and not isinstance(dataset,
                                                                      EpochSeededDataset):
            datamodule.train_dataset = EpochSeededDataset(dataset)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from crasmra.data.sampling import EpochShuffleSampler
        from crasmra.lightning_private import restart_train_iterator

        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if (isinstance(sampler, EpochShuffleSampler) and sampler.iterated_epoch is not None
                and sampler.iterated_epoch != sampler.epoch):
            restart_train_iterator(trainer)


class AtomicSaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` writer, atomic and never over an input.

    Lightning's writer opens ``config.yaml`` for writing: a link there is written through (into
    whatever it points at) and a crash leaves half a file. This one checks the path with
    :func:`crasmra.files.check_output` (not one of the command's ``inputs``, not a
    checkpoint) and writes it with :func:`crasmra.files.write_text`. Remote paths and
    ``multifile`` keep Lightning's behaviour.

    Args:
        inputs: The files the command reads (its ``--config`` files, its checkpoint).
    """

    def __init__(self, *args: Any, inputs: Any = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs = [Path(p) for p in inputs]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if self.already_saved:
            return
        if not self.save_to_log_dir or self.multifile:
            super().setup(trainer, pl_module, stage)
            return
        log_dir = trainer.log_dir  # broadcast to every rank
        assert log_dir is not None
        if not isinstance(get_filesystem(log_dir), LocalFileSystem):
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            path = Path(log_dir) / self.config_filename
            check_output(path, "--trainer.default_root_dir", inputs=self.inputs)
            if not self.overwrite and path.is_file():
                raise RuntimeError(f"{path} exists; not overwriting it.")
            write_text(path, _dump_config(self.parser, self.config))
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _dump_config(parser: Any, config: Any) -> str:
    # jsonargparse renamed skip_none to skip_unset; Lightning's own writer keeps every key.
    import inspect

    if "skip_unset" in inspect.signature(parser.dump).parameters:
        return parser.dump(config, skip_unset=False)
    return parser.dump(config, skip_none=False)


class ResumableCheckpoint(LastFollowsEverySave):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every save point, improved or not.

    Lightning 2.6 refreshes ``last.ckpt`` only when a top-k checkpoint was written at the same
    step ("Only save last checkpoint if a checkpoint was actually saved in this step"). With
    ``best.ckpt`` chosen on a validation metric, an epoch that does not improve it leaves
    ``last.ckpt`` at the best epoch, so ``--ckpt_path last`` after a crash would silently
    repeat every epoch since the last improvement. Marking each processed save point as saved
    restores "last = the latest save point".
    """

    @property
    def state_key(self) -> str:
        # The key ModelCheckpoint itself would use, so checkpoints written before this class
        # existed resume with their best-score state, and the other way round.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def after_topk_save(self, trainer: L.Trainer) -> None:
        if self.save_last:
            # The condition Lightning checks right after this call before writing last.ckpt;
            # it also keeps a second hook at the same step from saving twice.
            self.mark_saved(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # With --checkpoint.every_n_train_steps N, save points fall on multiples of N: a run
        # of 42 steps with N = 5 would end with last.ckpt at step 40 and the final weights
        # nowhere. The final step is always a save point of last.ckpt.
        if self.save_last and not trainer.interrupted:
            self.save_last_now(trainer)
