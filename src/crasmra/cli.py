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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from crasmra._version import __version__
from crasmra.errors import CrasmraError, UsageError
from crasmra.flags import CrasmraArgumentParser

log = logging.getLogger("crasmra")

LIGHTNING_COMMANDS = {
    "fit": "train a model (YAML config + --model.* --data.* --trainer.* flags)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
}


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
def _cmd_demo(ns: argparse.Namespace) -> int:
    from crasmra.demo import run_demo

    run_demo(ns.out, epochs=ns.epochs, seed=ns.seed, overwrite=ns.overwrite,
             threads=ns.threads, quiet=ns.quiet)
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
    # crasmra's own warnings are messages to the user: one log line each, without Python's
    # file name and source line.
    warnings.showwarning = _show_warning


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        log.warning("%s", message)
        return
    # Python's own format, as warnings.showwarning writes it.
    stream = file if file is not None else sys.stderr
    stream.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``crasmra``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from crasmra.runner import run_lightning

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
