"""Running ``fit``, ``validate`` and ``test``: crasmra's LightningCLI and its run-folder rules.

:func:`run_lightning` is the one entry point of the three commands, for the command line,
the demo and sweeps alike; :func:`make_cli_class` builds the LightningCLI subclass whose
hooks make the checks before a run starts (writable folder, earlier runs, checkpoints, CPU
threads). Lightning is imported only when a class is made, so importing this package stays
cheap.
"""

from __future__ import annotations

from crasmra.runner.cli_class import describe_model, make_cli_class, with_atomic_checkpoint_io
from crasmra.runner.run import run_lightning

__all__ = ["describe_model", "make_cli_class", "run_lightning", "with_atomic_checkpoint_io"]
