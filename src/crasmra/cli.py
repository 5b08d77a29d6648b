"""The ``crasmra`` command line.

``fit``, ``validate`` and ``test`` are LightningCLI subcommands (YAML configs, ``--model.*``,
``--data.*``, ``--trainer.*``, ``--ckpt_path``, ``--print_config``); the other subcommands are
plain argparse front ends over library functions. This module holds no logic of its own
beyond wiring and error reporting.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import logging
import os
import pkgutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crasmra._version import __version__
from crasmra.errors import CrasmraError, UsageError
from crasmra.flags import CrasmraArgumentParser, check_class_paths, lightning_parser_class

log = logging.getLogger("crasmra")

LIGHTNING_COMMANDS = {
    "fit": "train a model (YAML config + --model.* --data.* --trainer.* flags)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
}


# ---------------------------------------------------------------------------------------------
# Lightning subcommands
# ---------------------------------------------------------------------------------------------
def _check_writable(folder: Path) -> None:
    """Fail before any work when the run folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(
            f"The output folder {folder} cannot be written ({err.strerror or err}). Choose another "
            "with --trainer.default_root_dir (or --out for `crasmra demo`)."
        ) from err


#: Free space kept on top of the checkpoints' estimate, for logs, metrics and the filesystem.
MIN_FREE_BYTES = 64 * 2**20


def checkpoint_size_estimate(model: Any) -> int:
    """Bytes of one training checkpoint of ``model``: weights and buffers, plus SGD momentum."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + momentum


def _check_free_space(folder: Path, model: Any) -> None:
    """Fail before training when ``folder`` cannot hold two checkpoints.

    Two, because ``best.ckpt`` and ``last.ckpt`` coexist and each is written next to the
    file it replaces before the rename. Finding out at the end of the first epoch, hours in,
    would waste the epoch.
    """
    import shutil

    needed = 2 * checkpoint_size_estimate(model) + MIN_FREE_BYTES
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UsageError(
            f"Not enough free disk space in {folder}: {free / 2**20:.0f} MiB free, about "
            f"{needed / 2**20:.0f} MiB needed for two checkpoints of this model. Free some space "
            "or choose another --trainer.default_root_dir."
        )


def _with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` plus :class:`~crasmra.callbacks.AtomicCheckpointIO` if none is a CheckpointIO."""
    from lightning.fabric.plugins import CheckpointIO

    from crasmra.callbacks import AtomicCheckpointIO

    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _make_cli_class() -> type:
    # Lightning is imported here, not at module import, so `crasmra --help` stays instant.
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from crasmra.callbacks import (
        MetricsFileCallback,
        ResumableCheckpoint,
        RunInfoCallback,
        keep_final_epoch_without_validation,
    )
    from crasmra.checkpoint import load_checkpoint_file
    from crasmra.cpu import configure_cpu, runs_on_cpu
    from crasmra.cpu import log as cpu_log
    from crasmra.engine import MONITOR, RNGStateCallback

    class CRASMRACLI(LightningCLI):
        """LightningCLI with crasmra's run-folder layout, links and input checks."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # No flag abbreviations, and one-line errors (see crasmra.flags).
            kwargs.setdefault("parser_class", lightning_parser_class())
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
            parser.link_arguments("model.backbone", "data.backbone", apply_on="parse")
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
            parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
            parser.link_arguments(
                "data.transform_config", "model.transform_config", apply_on="instantiate"
            )

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            self._plan_cpu(config)
            root = Path(config.trainer.default_root_dir or "runs/crasmra")
            ckpt_path = config.get("ckpt_path")
            if self.subcommand == "fit":
                _check_writable(root)
                if ckpt_path is None and not config.get("overwrite", False):
                    _refuse_earlier_run(root)
            if ckpt_path not in (None, "last", "best", "hpc") and not Path(ckpt_path).is_file():
                raise UsageError(f"--ckpt_path {ckpt_path} does not exist.")
            if ckpt_path == "last" and self.subcommand == "fit":
                last = root / "checkpoints" / "last.ckpt"
                if not last.is_file():
                    raise UsageError(
                        f"--ckpt_path last: no checkpoint at {last}. Resume with the same "
                        "--trainer.default_root_dir (or --config) as the interrupted run."
                    )
                load_checkpoint_file(last)
            init_from = config.model.get("init_from")
            if init_from:
                # Before the data module is built: a bad file must fail before any other work.
                load_checkpoint_file(init_from)
            pretrained = config.model.get("pretrained")
            if isinstance(pretrained, str) and Path(pretrained).is_file():
                # Read once here for the checks the backbone loader lacks: torch.load does not
                # verify the zip checksums (flipped bytes would load as wrong weights), and a
                # refused pickle gets a one-line reason instead of PyTorch's advice to retry
                # with weights_only=False.
                load_checkpoint_file(pretrained)

        def _plan_cpu(self, config: Any) -> None:
            # Threads and loader workers are chosen together, before the data module starts
            # any worker (see crasmra.cpu). The choice is logged once the input has passed
            # every check (_announce_cpu), so that a bad input still gets a one-line error.
            accelerator = config.trainer.get("accelerator") or "auto"
            device = accelerator if accelerator in ("cpu", "auto") else "cuda"
            plan = configure_cpu(
                device, config.data.num_workers, config.get("threads"), announce=False
            )
            config.data.num_workers = plan.workers
            # Announced where crasmra chose or was told the threads, not on an accelerator.
            chosen = runs_on_cpu(device) or plan.source != "auto"
            self._cpu_plan = plan if chosen else None

        def _announce_cpu(self) -> None:
            plan = getattr(self, "_cpu_plan", None)
            if plan is not None:
                cpu_log.info(plan.describe())

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
                    resume_step=self._resume_step(Path(root)) if resuming else None,
                )
            kwargs["default_root_dir"] = root
            kwargs["plugins"] = _with_atomic_checkpoint_io(trainer_config.get("plugins"))
            return super().instantiate_trainer(**kwargs)

        def _resume_step(self, root: Path) -> int | None:
            ckpt_path = self.config.fit.get("ckpt_path")
            if ckpt_path == "last":
                ckpt_path = root / "checkpoints" / "last.ckpt"
            if ckpt_path in ("best", "hpc") or not Path(ckpt_path).is_file():
                return None
            step = load_checkpoint_file(ckpt_path).get("global_step")
            return step if isinstance(step, int) else None

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads --ckpt_path with a bare torch.load to recover hyperparameters,
            # before any crasmra hook runs; validating the file first turns a truncated,
            # tampered or foreign checkpoint into one clear error instead of a traceback.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and Path(ckpt_path).is_file():
                checkpoint = load_checkpoint_file(ckpt_path)
                if subcommand in ("validate", "test"):
                    self._data_from_checkpoint(subcommand, checkpoint)
            super()._parse_ckpt_path()

        def _data_from_checkpoint(self, subcommand: str, checkpoint: dict[str, Any]) -> None:
            # Evaluating a checkpoint without any data option means "on the data it was trained
            # on": the checkpoint stores those settings, the parser's defaults are another set.
            stored = checkpoint.get("datamodule_hyper_parameters")
            if not isinstance(stored, dict):
                return
            given = self.config[subcommand].data.as_dict()
            defaults = self._subcommand_parsers[subcommand].get_defaults().data.as_dict()
            # data.backbone follows model.backbone (a link), whatever the user gave.
            given.pop("backbone", None)
            defaults.pop("backbone", None)
            if given != defaults:
                return
            stored = {k: v for k, v in stored.items() if not k.startswith("_")}
            self.config = self.parser.parse_object({subcommand: {"data": stored}}, self.config)
            log.info(
                "No --data options or --config: evaluating on the data the checkpoint was "
                "trained with (dataset %s%s).",
                stored.get("dataset"),
                f" at {stored['root']}" if stored.get("root") else "",
            )

        def before_fit(self) -> None:
            root = Path(self.trainer.default_root_dir)
            _check_free_space(root, self.model)
            self._announce_cpu()
            log.info("Model: %s", describe_model(self.model))
            if self.config.fit.get("overwrite") and not self.config.fit.get("ckpt_path"):
                # Only now, once the configuration, the data and the network have been checked:
                # bad input must never cost the earlier run.
                _clear_earlier_run(root)
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
            self._announce_cpu()

        def before_test(self) -> None:
            self._evaluation_folder()
            self._announce_cpu()

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
    CRASMRACLI.persistent_callbacks = lambda: [  # type: ignore[attr-defined]
        RNGStateCallback(),
        RunInfoCallback(),
        MetricsFileCallback(MONITOR),
    ]
    return CRASMRACLI


def describe_model(module: Any) -> str:
    """One line for the log: the backbone, the variant and the parameter counts.

    It replaces Lightning's model summary table, whose FLOPs column reads 0 for this module.
    """
    config = getattr(getattr(module, "net", None), "config", {}) or {}
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    name = f"{config.get('backbone', type(module).__name__)} {config.get('variant', '')}".strip()
    return f"{name}, {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable)"


def _earlier_run_files(root: Path) -> list[Path]:
    """The checkpoints and metrics files an earlier ``fit`` left in ``root``."""
    checkpoints = root / "checkpoints"
    earlier = sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
    return earlier + [p for p in (root / "metrics.csv", root / "metrics.json") if p.is_file()]


def _refuse_earlier_run(root: Path) -> None:
    """Fail when ``root`` holds another run's results, which a fresh ``fit`` would replace."""
    earlier = _earlier_run_files(root)
    if earlier:
        raise UsageError(
            f"{root} already holds an earlier run ({', '.join(p.name for p in earlier[:3])}). "
            "Resume it with --ckpt_path last, choose another --trainer.default_root_dir, or "
            "pass --overwrite true to replace it."
        )


def _clear_earlier_run(root: Path) -> None:
    """Delete what an earlier run left in ``root`` (``--overwrite true``), so none of it mixes
    with the new run's files (Lightning would otherwise write ``best-v1.ckpt`` beside them)."""
    import shutil

    earlier = _earlier_run_files(root)
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
            _drop_rows_from_step(Path(root) / "metrics.csv", resume_step)
        _keep_existing_csv(csv_logger)
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


def _drop_rows_from_step(path: Path, step: int) -> None:
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


def _keep_existing_csv(logger: Any) -> None:
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

    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    logger._experiment = _AppendingWriter(log_dir=logger.log_dir)


BASE_KEY = "__base__"


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, merging the files its ``__base__`` key names (paths relative to it).

    A recipe is then a short file over a shared base: ``__base__: ../base.yaml`` followed by
    what differs. Nested sections merge key by key; anything else in the file replaces the base.
    """
    import yaml

    path = Path(path).resolve()
    if path in _chain:
        raise UsageError(
            f"Config {path} includes itself through {BASE_KEY}: {[str(p) for p in _chain]}"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of settings, not {type(data).__name__}.")
    bases = data.pop(BASE_KEY, None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise UsageError(f"{path}: {BASE_KEY} names {base_path}, which does not exist.")
        merged = _deep_merge(merged, load_config(base_path, (*_chain, path)))
    return _deep_merge(merged, data)


def expand_config_args(args: Sequence[str]) -> list[str]:
    """Replace every ``--config FILE`` whose file uses ``__base__`` by its merged content.

    jsonargparse's own nested ``config:`` key does not merge nested sections (a recipe's
    ``data:`` would reset the base's ``data:``), hence this resolution before parsing.
    """
    import yaml

    out: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg in ("--config", "-c") and i + 1 < len(items):
            value, i = items[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        try:
            is_file = "\n" not in value and Path(value).is_file()
        except OSError:  # a YAML string rather than a path
            is_file = False
        if is_file and BASE_KEY in (Path(value).read_text()):
            value = yaml.safe_dump(load_config(value), sort_keys=False)
        out.append(f"--config={value}")
    return out


def run_lightning(args: Sequence[str] | dict[str, Any], verbose_test: bool = True) -> Any:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``) and return the CLI object.

    Args:
        args: The command line after ``crasmra``, or a parsed config.
        verbose_test: Whether the test after ``fit`` prints Lightning's metrics table.
    """
    from crasmra.data import FGVCDataModule
    from crasmra.engine import CRASMRAModule

    args = expand_config_args(args) if not isinstance(args, dict) else args
    check_class_paths(args)
    cli_class = _make_cli_class()
    cli_class.verbose_test = verbose_test
    # `args` is how every crasmra entry point (main, demo, sweep) hands LightningCLI its
    # arguments; LightningCLI's warning about sys.argv also being set does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return cli_class(
        CRASMRAModule,
        FGVCDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": "runs/crasmra",
            # One line from before_fit instead (describe_model).
            "enable_model_summary": False,
            "callbacks": cli_class.persistent_callbacks(),
        },
        seed_everything_default=0,
        parser_kwargs={"description": "crasmra: CRA-SMRA fine-grained visual classification"},
        args=args,
    )


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
def _cmd_demo(ns: argparse.Namespace) -> int:
    import yaml

    from crasmra.demo import DEMO_CONFIG, format_results_table

    out = Path(ns.out)
    _check_writable(out)
    if not ns.overwrite:
        try:
            _refuse_earlier_run(out)
        except UsageError:
            raise UsageError(
                f"{out} holds an earlier demo run. Run `crasmra demo --overwrite` to replace it, "
                "or `crasmra demo --out DIR` to keep it and write elsewhere."
            ) from None
    args = [
        "fit",
        f"--config={yaml.safe_dump(DEMO_CONFIG)}",
        f"--trainer.default_root_dir={out}",
        f"--overwrite={str(ns.overwrite).lower()}",
    ]
    if ns.seed is not None:
        args.append(f"--seed_everything={ns.seed}")
    if ns.epochs is not None:
        if ns.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {ns.epochs}.")
        args.append(f"--trainer.max_epochs={ns.epochs}")
    if ns.threads is not None:
        args.append(f"--threads={ns.threads}")
    if ns.quiet:
        args.append("--trainer.enable_progress_bar=false")
    start = time.perf_counter()
    cli = run_lightning(args, verbose_test=False)
    elapsed = time.perf_counter() - start
    print(format_results_table(out / "metrics.json", cli.datamodule.num_classes))
    print(f"\nWall time: {elapsed:.0f} s. Run folder: {out}")
    ckpt = cli.trainer.checkpoint_callback
    chosen_by = "by validation combined top-1" if ckpt.monitor else "the final epoch: no validation"
    print(f"Best checkpoint ({chosen_by}): {ckpt.best_model_path}")
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; LightningCLI subcommands are listed and handed over unparsed."""
    from crasmra.cpu import add_threads_option

    parser = CrasmraArgumentParser(
        prog="crasmra",
        description="CRA-SMRA fine-grained visual classification: train, evaluate and use models.",
        epilog="Run `crasmra COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"crasmra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)

    demo = sub.add_parser(
        "demo", help="train and evaluate on the built-in synthetic set (CPU, minutes)"
    )
    demo.add_argument(
        "--epochs", type=int, default=None, help="number of epochs (default: the demo config's)"
    )
    demo.add_argument(
        "--out", default="crasmra-demo", help="output folder (default: ./crasmra-demo)"
    )
    demo.add_argument(
        "--seed", type=int, default=None, help="seed of the initialisation and the batch order "
        "(default: the demo config's, 0); the synthetic images stay the same"
    )
    demo.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo run in the output folder"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(demo)
    demo.set_defaults(func=_cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """The ``register`` functions of the modules in :mod:`crasmra.commands`, in name order."""
    import crasmra.commands

    return [
        importlib.import_module(f"crasmra.commands.{info.name}").register
        for info in sorted(pkgutil.iter_modules(crasmra.commands.__path__), key=lambda m: m.name)
    ]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    ``main`` may run many times in one process (tests, sweeps), with ``sys.stderr`` replaced
    in between; a handler holding the first stream would write to a closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    # Only crasmra's own logger: Lightning configures its own, and a root handler would
    # print every Lightning message twice.
    if log.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("CRASMRA_LOG_LEVEL", "INFO").upper())
    log.propagate = False
    # Lightning advertises a hosted logger on every run; that is noise in a research tool's output.
    # Nor does it help to hear that the training loader is loaded to count the steps.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith(("💡", "Loading `train_dataloader`"))
    )
    # crasmra refuses a run folder that holds an earlier run (or clears it with --overwrite)
    # before Lightning looks; its warning about a non-empty folder would only repeat that.
    warnings.filterwarnings(
        "ignore", message=r"Experiment logs directory .* exists and is not empty"
    )
    # Raised inside Lightning's own utilities on current torch; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``crasmra``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_lightning(argv)
            return 0
        parser = build_parser()
        ns = parser.parse_args(argv)
        if not getattr(ns, "func", None):
            parser.print_help()
            return 0 if not argv else 2
        return int(ns.func(ns) or 0)
    except CrasmraError as err:
        if os.environ.get("CRASMRA_DEBUG") and not isinstance(err, UsageError):
            raise
        print(f"crasmra: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except (ValueError, FileNotFoundError) as err:
        # Input validation across the package raises these with a message that says what to
        # change; a traceback would only bury it.
        if os.environ.get("CRASMRA_DEBUG"):
            raise
        print(f"crasmra: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # Lightning's own check of a --trainer.* value (e.g. max_epochs -5) is bad input too.
        if type(err).__name__ != "MisconfigurationException" or os.environ.get("CRASMRA_DEBUG"):
            raise
        print(f"crasmra: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
