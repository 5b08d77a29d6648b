"""The ``crasmra`` command line.

``fit``, ``validate`` and ``test`` are LightningCLI subcommands (YAML configs, ``--model.*``,
``--data.*``, ``--trainer.*``, ``--ckpt_path``, ``--print_config``); the other subcommands are
plain argparse front ends over library functions. This module holds no logic of its own
beyond wiring and error reporting.
"""

from __future__ import annotations

import argparse
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

from crasmra import __version__

log = logging.getLogger("crasmra")

LIGHTNING_COMMANDS = {
    "fit": "train a model (YAML config + --model.* --data.* --trainer.* flags)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
}


class UsageError(Exception):
    """A problem with the user's input; printed as one message without a traceback."""


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


def _make_cli_class() -> type:
    # Lightning is imported here, not at module import, so `crasmra --help` stays instant.
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from crasmra.callbacks import MetricsFileCallback, RunInfoCallback
    from crasmra.engine import MONITOR, RNGStateCallback

    class CRASMRACLI(LightningCLI):
        """LightningCLI with crasmra's run-folder layout, links and input checks."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
            })
            parser.add_argument(
                "--test_after_fit", type=bool, default=True,
                help="After `fit`, evaluate the best checkpoint (by validation) on the test split.",
            )
            parser.link_arguments("model.backbone", "data.backbone", apply_on="parse")
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
            parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
            parser.link_arguments("data.transform_config", "model.transform_config",
                                  apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            root = Path(config.trainer.default_root_dir or "runs/crasmra")
            if self.subcommand == "fit":
                _check_writable(root)
            ckpt_path = config.get("ckpt_path")
            if ckpt_path not in (None, "last", "best", "hpc") and not Path(ckpt_path).is_file():
                raise UsageError(f"--ckpt_path {ckpt_path} does not exist.")
            if ckpt_path == "last" and self.subcommand == "fit":
                last = root / "checkpoints" / "last.ckpt"
                if not last.is_file():
                    raise UsageError(
                        f"--ckpt_path last: no checkpoint at {last}. Resume with the same "
                        "--trainer.default_root_dir (or --config) as the interrupted run."
                    )

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer_config = self._get(self.config_init, "trainer", default={})
            root = trainer_config.get("default_root_dir") or "runs/crasmra"
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = default_loggers(root)
            kwargs["default_root_dir"] = root
            return super().instantiate_trainer(**kwargs)

        def after_fit(self) -> None:
            if not self.config.fit.get("test_after_fit", True):
                return
            ckpt = self.trainer.checkpoint_callback
            best = getattr(ckpt, "best_model_path", "") or None
            if self.trainer.interrupted:
                return
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)

    CRASMRACLI.persistent_callbacks = lambda: [  # type: ignore[attr-defined]
        RNGStateCallback(), RunInfoCallback(), MetricsFileCallback(MONITOR)
    ]
    return CRASMRACLI


def default_loggers(root: str | Path) -> list[Any]:
    """CSV metrics in ``root/metrics.csv`` plus TensorBoard in ``root/tensorboard`` if installed."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(root), name="", version="")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.debug("tensorboard is not installed; logging to CSV only")
    else:
        loggers.append(TensorBoardLogger(save_dir=str(root), name="tensorboard", version="",
                                         default_hp_metric=False))
    return loggers


def run_lightning(args: Sequence[str] | dict[str, Any]) -> Any:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``) and return the CLI object."""
    from crasmra.data import FGVCDataModule
    from crasmra.engine import CRASMRAModule

    cli_class = _make_cli_class()
    # `args` is how every crasmra entry point (main, demo, sweep) hands LightningCLI its
    # arguments; LightningCLI's warning about sys.argv also being set does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return cli_class(
        CRASMRAModule,
        FGVCDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": "runs/crasmra",
            "callbacks": cli_class.persistent_callbacks(),
        },
        seed_everything_default=0,
        parser_kwargs={"description": "crasmra: CRA-SMRA fine-grained visual classification"},
        args=list(args) if not isinstance(args, dict) else args,
    )


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
def _cmd_demo(ns: argparse.Namespace) -> int:
    import yaml

    from crasmra.demo import DEMO_CONFIG, format_results_table

    out = Path(ns.out)
    _check_writable(out)
    args = [
        "fit",
        f"--config={yaml.safe_dump(DEMO_CONFIG)}",
        f"--trainer.default_root_dir={out}",
    ]
    if ns.epochs is not None:
        if ns.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {ns.epochs}.")
        args.append(f"--trainer.max_epochs={ns.epochs}")
    if ns.quiet:
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    start = time.perf_counter()
    cli = run_lightning(args)
    elapsed = time.perf_counter() - start
    print(format_results_table(out / "metrics.json", cli.datamodule.num_classes))
    print(f"\nWall time: {elapsed:.0f} s. Run folder: {out}")
    best = cli.trainer.checkpoint_callback.best_model_path
    print(f"Best checkpoint (by validation combined top-1): {best}")
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; LightningCLI subcommands are listed and handed over unparsed."""
    parser = argparse.ArgumentParser(
        prog="crasmra",
        description="CRA-SMRA fine-grained visual classification: train, evaluate and use models.",
        epilog="Run `crasmra COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"crasmra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)

    demo = sub.add_parser("demo", help="train and evaluate on the built-in synthetic set (CPU, minutes)")
    demo.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the demo config's)")
    demo.add_argument("--out", default="crasmra-demo", help="output folder (default: ./crasmra-demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
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


def _configure_logging() -> None:
    # Only crasmra's own logger: Lightning configures its own, and a root handler would
    # print every Lightning message twice.
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("CRASMRA_LOG_LEVEL", "INFO").upper())
    log.propagate = False


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
    except UsageError as err:
        print(f"crasmra: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        # Input validation across the package raises these with a message that says what to
        # change; a traceback would only bury it.
        if os.environ.get("CRASMRA_DEBUG"):
            raise
        print(f"crasmra: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
