"""The LightningCLI subclass behind ``crasmra fit``, ``validate`` and ``test``.

Its hooks hold the order of a run: the checks made before anything is instantiated
(:mod:`crasmra.runner.checks`, :mod:`crasmra.runner.start`), the CPU settings
(:mod:`crasmra.runner.cpu_choice`), the trainer's loggers and checkpoint I/O, and the test
after ``fit``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from crasmra.errors import UsageError
from crasmra.flag_moves import nest_flat_hparams
from crasmra.flags import lightning_parser_class
from crasmra.runfolder import check_free_space, clear_earlier_run, default_loggers

__all__ = ["describe_model", "make_cli_class", "with_atomic_checkpoint_io"]

log = logging.getLogger("crasmra")


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` plus :class:`~crasmra.callbacks.AtomicCheckpointIO` if none is a CheckpointIO."""
    from lightning.fabric.plugins import CheckpointIO

    from crasmra.callbacks import AtomicCheckpointIO

    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def describe_model(module: Any) -> str:
    """One line for the log: the backbone, the variant and the parameter counts.

    It replaces Lightning's model summary table, whose FLOPs column reads 0 for this module.
    """
    config = getattr(getattr(module, "net", None), "config", {}) or {}
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    name = f"{config.get('backbone', type(module).__name__)} {config.get('variant', '')}".strip()
    return f"{name}, {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable)"


def make_cli_class() -> type:
    """The LightningCLI subclass of ``crasmra fit``, ``validate`` and ``test``."""
    # Lightning is imported here, not at module import, so `crasmra --help` stays instant.
    from lightning.pytorch.cli import LightningArgumentParser

    from crasmra.callbacks import (
        MetricsFileCallback,
        RunInfoCallback,
        SeededLoaderWorkers,
        keep_final_epoch_without_validation,
    )
    from crasmra.engine import RNGStateCallback
    from crasmra.lightning_private import CheckpointHparamsHook, subcommand_parser
    from crasmra.metric_names import MONITOR
    from crasmra.runner.arguments import add_run_arguments
    from crasmra.runner.checks import (
        check_outputs,
        check_weight_files,
        evaluation_data,
        prepare_run_folder,
    )
    from crasmra.runner.cpu_choice import CPUChoice, plan_run_cpu
    from crasmra.runner.start import StartCheckpoint

    class CRASMRACLI(CheckpointHparamsHook):
        """LightningCLI with crasmra's run-folder layout, links and input checks."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # No flag abbreviations, and one-line errors (see crasmra.flags).
            kwargs.setdefault("parser_class", lightning_parser_class())
            # What the checks keep for later hooks: the checkpoint the run starts from
            # (--ckpt_path) and the CPU settings, announced once the run starts.
            self._start = StartCheckpoint()
            self._cpu = CPUChoice()
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            add_run_arguments(parser)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            self._cpu = plan_run_cpu(config)
            root = Path(config.trainer.default_root_dir or "runs/crasmra")
            last = prepare_run_folder(self.subcommand, config, root)
            if last is not None:
                self._start.read(last)
            check_outputs(self.subcommand, config, root, self.input_files)
            # Before anything is allocated: the network the options describe must be the one
            # whose weights the file holds.
            self._start.check_options(config)
            # Before the data module is built: a bad file must fail before any other work.
            check_weight_files(config)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer_config = self._get(self.config_init, "trainer", default={})
            root = trainer_config.get("default_root_dir") or "runs/crasmra"
            if trainer_config.get("logger") in (None, True):
                # validate/test log into their own subfolder so that they never replace the
                # training run's metrics.csv, config.yaml or TensorBoard events.
                log_root = Path(root) if self.subcommand == "fit" else Path(root) / self.subcommand
                resuming = self.subcommand == "fit" and self.config.fit.get("ckpt_path")
                # An evaluation appends its rows: a later (even a failing) one never deletes
                # what an earlier one wrote.
                kwargs["logger"] = default_loggers(
                    log_root,
                    append=bool(resuming) or self.subcommand != "fit",
                    resume_step=self._start.global_step if resuming else None,
                )
            kwargs["default_root_dir"] = root
            kwargs["plugins"] = with_atomic_checkpoint_io(trainer_config.get("plugins"))
            return super().instantiate_trainer(**kwargs)

        def before_checkpoint_hparams(self) -> dict[str, Any] | None:
            # LightningCLI reads --ckpt_path with a bare torch.load to recover hyperparameters,
            # before any crasmra hook runs; validating the file first turns a truncated,
            # tampered or foreign checkpoint into one clear error instead of a traceback.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not (ckpt_path and Path(ckpt_path).is_file()):
                return None
            checkpoint = self._start.read(ckpt_path)
            hparams = checkpoint.get("hyper_parameters")
            if isinstance(hparams, dict) and "_class_path" not in hparams:
                # Before Lightning parses them (a list of 100,000 class names alone takes
                # minutes) and builds the network they describe.
                self._start.check_hparams(hparams)
                # A checkpoint written before the parts holds them flat: parsed in their parts.
                hparams = nest_flat_hparams(hparams)
            if subcommand in ("validate", "test"):
                self._data_from_checkpoint(subcommand, checkpoint)
            return hparams if isinstance(hparams, dict) else {}

        def _data_from_checkpoint(self, subcommand: str, checkpoint: dict[str, Any]) -> None:
            stored = evaluation_data(
                checkpoint,
                given=self.config[subcommand].data.as_dict(),
                defaults=subcommand_parser(self, subcommand).get_defaults().data.as_dict(),
                source=self._start.path or "--ckpt_path",
            )
            if stored is None:
                return
            self.config = self.parser.parse_object({subcommand: {"data": stored}}, self.config)
            log.info(
                "No --data options or --config: evaluating on the data the checkpoint was "
                "trained with (dataset %s%s).",
                stored.get("dataset"),
                f" at {stored['root']}" if stored.get("root") else "",
            )

        def before_fit(self) -> None:
            root = Path(self.trainer.default_root_dir)
            check_free_space(root, self.model)
            self._cpu.announce()
            log.info("Model: %s", describe_model(self.model))
            if self.config.fit.get("overwrite") and not self.config.fit.get("ckpt_path"):
                # Only now, once the configuration, the data and the network have been checked:
                # bad input must never cost the earlier run.
                clear_earlier_run(root)
            # Without a validation split (--data.val_fraction 0, the paper's protocol) best.ckpt
            # is the final epoch: it is never chosen on anything but validation.
            if keep_final_epoch_without_validation(
                self.trainer, getattr(self.datamodule, "has_val", True)
            ):
                # Lightning's note on the empty validation loader says nothing new then.
                warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")

        def _evaluation_folder(self) -> None:
            # Lightning notes that a checkpoint from another folder does not restore the
            # checkpoint callback's bookkeeping; an evaluation needs none of it.
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
            # A stand-alone evaluation keeps its metrics.json beside its metrics.csv, in
            # ROOT/validate or ROOT/test, out of the training run's record.
            folder = Path(self.trainer.default_root_dir) / self.subcommand
            for callback in self.trainer.callbacks:
                if isinstance(callback, MetricsFileCallback):
                    callback.folder = folder

        def before_validate(self) -> None:
            self._evaluation_folder()
            if not getattr(self.datamodule, "has_val", True):
                raise UsageError(
                    "`validate` needs a validation split and this data has none (the paper "
                    "recipes train on the whole training split). Add --data.val_fraction 0.1 "
                    "(the value the run was trained with, so that the split is the same), or "
                    "evaluate on the test split with `crasmra test`."
                )
            self._cpu.announce()

        def before_test(self) -> None:
            self._evaluation_folder()
            self._cpu.announce()

        def after_fit(self) -> None:
            if not self.config.fit.get("test_after_fit", True):
                return
            ckpt = self.trainer.checkpoint_callback
            # best.ckpt: the best epoch by validation, or the final epoch without validation.
            best = getattr(ckpt, "best_model_path", "") or None
            if self.trainer.interrupted:
                return
            self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=best, verbose=self.verbose_test
            )

    #: Whether the test after `fit` prints Lightning's table (the demo prints its own).
    CRASMRACLI.verbose_test = True  # type: ignore[attr-defined]
    #: The --config files of the command line (set by run_lightning): never written over.
    CRASMRACLI.input_files = ()  # type: ignore[attr-defined]
    CRASMRACLI.persistent_callbacks = lambda: [  # type: ignore[attr-defined]
        RNGStateCallback(),
        SeededLoaderWorkers(),
        RunInfoCallback(),
        MetricsFileCallback(MONITOR),
    ]
    return CRASMRACLI
