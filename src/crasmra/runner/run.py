"""``run_lightning``: the one entry point of ``fit``, ``validate`` and ``test``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from crasmra.config import config_files, expand_config_args
from crasmra.flag_moves import refuse_moved_flags
from crasmra.flags import check_class_paths
from crasmra.runner.cli_class import make_cli_class

__all__ = ["run_lightning"]


def run_lightning(args: Sequence[str] | dict[str, Any], verbose_test: bool = True) -> Any:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``) and return the CLI object.

    Args:
        args: The command line after ``crasmra``, or a parsed config.
        verbose_test: Whether the test after ``fit`` prints Lightning's metrics table.
    """
    from crasmra.callbacks import AtomicSaveConfig
    from crasmra.data import FGVCDataModule
    from crasmra.engine import CRASMRAModule

    inputs = config_files(args) if not isinstance(args, dict) else []
    args = expand_config_args(args) if not isinstance(args, dict) else args
    check_class_paths(args)
    refuse_moved_flags(args)
    cli_class = make_cli_class()
    cli_class.verbose_test = verbose_test
    cli_class.input_files = tuple(inputs)
    # `args` is how every crasmra entry point (main, demo, sweep) hands LightningCLI its
    # arguments; LightningCLI's warning about sys.argv also being set does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return cli_class(
        CRASMRAModule,
        FGVCDataModule,
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True, "inputs": inputs},
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
