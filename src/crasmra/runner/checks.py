"""The checks ``fit``, ``validate`` and ``test`` make before anything is instantiated.

Each refuses a bad input with one line while nothing has been built or written, so that a
mistake never costs an earlier run's files nor minutes of data loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crasmra.checkpoint import check_data_settings, load_checkpoint_file
from crasmra.errors import UsageError
from crasmra.files import check_output
from crasmra.runfolder import create_run_folder, refuse_earlier_run

__all__ = ["check_outputs", "check_weight_files", "evaluation_data", "prepare_run_folder"]


def prepare_run_folder(subcommand: str, config: Any, root: Path) -> Path | None:
    """Check the run folder and ``--ckpt_path``; ``fit`` creates the folder first.

    A ``fit`` into a folder that holds an earlier run is refused unless it resumes
    (``--ckpt_path``) or replaces it (``--overwrite``).

    Returns:
        The ``last.ckpt`` that ``fit --ckpt_path last`` resumes from, else None.

    Raises:
        UsageError: An earlier run is in the way, or the checkpoint to start from is missing.
    """
    ckpt_path = config.get("ckpt_path")
    if subcommand == "fit":
        create_run_folder(root)
        if ckpt_path is None and not config.get("overwrite", False):
            refuse_earlier_run(root)
    if ckpt_path not in (None, "last", "best", "hpc") and not Path(ckpt_path).is_file():
        raise UsageError(f"--ckpt_path {ckpt_path} does not exist.")
    if ckpt_path != "last" or subcommand != "fit":
        return None
    last = root / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise UsageError(
            f"--ckpt_path last: no checkpoint at {last}. Resume with the same "
            "--trainer.default_root_dir (or --config) as the interrupted run."
        )
    return last


def check_outputs(subcommand: str, config: Any, root: Path, input_files: Sequence[str]) -> None:
    """Refuse a run folder whose files would replace one of the command's inputs.

    The files this command writes into the run folder (config.yaml, classes.txt,
    run_info.json, metrics) must not be one of its inputs (e.g. --config ROOT/config.yaml)
    nor a checkpoint, a copy or a link.
    """
    folder = root if subcommand == "fit" else root / subcommand
    inputs = [*input_files, *(
        p for p in (config.get("ckpt_path"), config.model.runtime.get("init_from"),
                    config.model.net.get("pretrained"))
        if isinstance(p, str) and Path(p).is_file())]
    names = ["config.yaml", "metrics.csv", "metrics.json"]
    if subcommand == "fit":
        names += ["classes.txt", "run_info.json"]
    for name in names:
        check_output(folder / name, "--trainer.default_root_dir", inputs=inputs)


def check_weight_files(config: Any) -> None:
    """Read ``--model.runtime.init_from`` and a ``--model.net.pretrained`` file once, to refuse
    a bad one before the data module is built."""
    init_from = config.model.runtime.get("init_from")
    if init_from:
        load_checkpoint_file(init_from)
    pretrained = config.model.net.get("pretrained")
    if isinstance(pretrained, str) and Path(pretrained).is_file():
        # Read once here for the checks the backbone loader lacks: torch.load does not
        # verify the zip checksums (flipped bytes would load as wrong weights), and a
        # refused pickle gets a one-line reason instead of PyTorch's advice to retry
        # with weights_only=False.
        load_checkpoint_file(pretrained)


def evaluation_data(
    checkpoint: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any], source: str
) -> dict[str, Any] | None:
    """The data settings a ``validate`` or ``test`` without data options evaluates on.

    Evaluating a checkpoint without any data option means "on the data it was trained on":
    the checkpoint stores those settings, the parser's defaults are another set.

    Args:
        checkpoint: The checkpoint evaluated.
        given: The command's ``data`` section.
        defaults: The parser's defaults of that section.
        source: The checkpoint's path, for the messages.

    Returns:
        The stored settings, checked, or None when data options were given or none are
        stored.
    """
    stored = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(stored, dict):
        return None
    # data.backbone follows model.backbone (a link), whatever the user gave.
    given = {k: v for k, v in given.items() if k != "backbone"}
    defaults = {k: v for k, v in defaults.items() if k != "backbone"}
    if given != defaults:
        return None
    # Only the settings that select the images and their transform, each checked as a
    # command-line value would be (a file's batch size or worker count is not taken).
    return check_data_settings(stored, source)
