"""Every use of Lightning's private API, in one place.

Lightning offers no public hook for four things crasmra needs. Each is wrapped here, and
``tests/test_lightning_private.py`` checks that the installed Lightning still has every name
used, so an upgrade that renames one fails there, by name, rather than somewhere in a run.

- :class:`LastFollowsEverySave`: ``ModelCheckpoint._save_topk_checkpoint``,
  ``_last_global_step_saved``, ``_save_last_checkpoint`` and ``_monitor_candidates``, so that
  ``last.ckpt`` follows every save point and always holds the final step.
- :class:`CheckpointHparamsHook`: ``LightningCLI._parse_ckpt_path``, the step that reads
  ``--ckpt_path``'s hyperparameters, so crasmra can check the file first.
- :func:`subcommand_parser`: ``LightningCLI._subcommand_parsers``, for a subcommand's defaults.
- :class:`ParseOnly`: ``LightningCLI._set_seed`` and ``_run_subcommand``, to parse a command
  line exactly as ``fit`` would with nothing run.
- :func:`replace_csv_writer`: ``CSVLogger._experiment``, to make the CSV logger append.
- :func:`restart_train_iterator`: ``_FitLoop._data_fetcher``, to draw a resumed epoch's
  batches after its sampler knows the epoch.

Imports Lightning at import time: only the modules that run Lightning import this one.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

__all__ = [
    "PRIVATE_NAMES",
    "CheckpointHparamsHook",
    "LastFollowsEverySave",
    "ParseOnly",
    "replace_csv_writer",
    "restart_train_iterator",
    "subcommand_parser",
]

#: (class, attribute) pairs of Lightning's private API this module relies on; the test checks
#: each against the installed Lightning. Instance attributes are checked on a fresh instance.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_topk_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_last_global_step_saved"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"),
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path"),
    ("lightning.pytorch.cli.LightningCLI", "_set_seed"),
    ("lightning.pytorch.cli.LightningCLI", "_run_subcommand"),
    ("lightning.pytorch.cli.LightningCLI", "_subcommand_parsers"),
    ("lightning.pytorch.loggers.CSVLogger", "_experiment"),
    ("lightning.pytorch.loops.fit_loop._FitLoop", "_data_fetcher"),
)


class LastFollowsEverySave(ModelCheckpoint):
    """A ``ModelCheckpoint`` told after each top-k save point, so subclasses can act on it.

    :meth:`after_topk_save` runs right after Lightning's private ``_save_topk_checkpoint``;
    :meth:`mark_saved` sets the private ``_last_global_step_saved`` that Lightning checks
    before writing ``last.ckpt``.
    """

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self.after_topk_save(trainer)

    def after_topk_save(self, trainer: Any) -> None:
        """Called after each top-k save point (whether or not a file was written)."""

    def mark_saved(self, global_step: int) -> None:
        """Record ``global_step`` as saved: ``last.ckpt`` is written for it, and only once."""
        self._last_global_step_saved = global_step

    def save_last_now(self, trainer: Any) -> None:
        """Write ``last.ckpt`` for the current step unless a save point already did (private
        ``_save_last_checkpoint`` and ``_monitor_candidates``)."""
        if self._last_global_step_saved == trainer.global_step or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.mark_saved(trainer.global_step)


class CheckpointHparamsHook(LightningCLI):
    """A LightningCLI that calls :meth:`before_checkpoint_hparams` before it reads
    ``--ckpt_path``'s hyperparameters with a bare ``torch.load`` (private ``_parse_ckpt_path``)."""

    def _parse_ckpt_path(self) -> None:
        hparams = self.before_checkpoint_hparams()
        if hparams is None:
            super()._parse_ckpt_path()
            return
        # Lightning's own step (its private _parse_ckpt_path), on the hyperparameters the hook
        # read and converted instead of on a second bare torch.load of the file.
        hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object(
                {self.config.subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def before_checkpoint_hparams(self) -> dict[str, Any] | None:
        """Runs once the command line is parsed, before anything reads the checkpoint.

        Returns:
            The checkpoint's hyperparameters to parse as the ``model`` section (read and
            converted by the hook), or None to let Lightning read them from the file.
        """
        return None


def subcommand_parser(cli: LightningCLI, subcommand: str) -> Any:
    """The parser of one subcommand (``fit``, ``validate``, ``test``) of ``cli``."""
    return cli._subcommand_parsers[subcommand]


class ParseOnly:
    """Mixin for a LightningCLI subclass that parses its arguments and does nothing else.

    Put it first in the bases: ``class Check(ParseOnly, CLIClass)``.
    """

    def _set_seed(self) -> None: ...
    def before_instantiate_classes(self) -> None: ...
    def instantiate_classes(self) -> None: ...
    def after_instantiate_classes(self) -> None: ...
    def _run_subcommand(self, subcommand: str | None) -> None: ...


def replace_csv_writer(logger: Any, writer: Any) -> None:
    """Make a ``CSVLogger`` write through ``writer`` (its private ``_experiment``)."""
    logger._experiment = writer


def restart_train_iterator(trainer: Any) -> bool:
    """At an epoch's start, make the training loader's iterator again if Lightning will not
    (``iter()`` on the fit loop's private ``_data_fetcher``).

    Lightning makes the iterator while setting up the data, before it tells the sampler the
    epoch, and makes it again at the start of every later epoch of an uninterrupted run, but
    not of the first epoch of a resumed one (its own condition, in
    ``_TrainingEpochLoop.on_run_start``, is repeated here): a loader with workers has by then
    drawn that epoch's first indices for epoch 0.

    Returns:
        Whether the iterator was made again.
    """
    fit_loop = trainer.fit_loop
    lightning_will = (trainer.current_epoch > 0 and not fit_loop.is_resuming
                      and not fit_loop.epoch_loop.restarting)
    if lightning_will or fit_loop._data_fetcher is None:
        return False
    iter(fit_loop._data_fetcher)
    return True
