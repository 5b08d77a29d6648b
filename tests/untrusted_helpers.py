"""Helpers of the tests that treat checkpoints, configs, folders and clients as untrusted input
(``test_untrusted_*.py``, issue 24)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import run_cli

# tests/configs/tiny.yaml's synthetic set, written out (the options replace the config's).
TINY_OPTIONS = "num_classes: 4, samples_per_class: 8, native_size: 64"


def run(args: list[str]) -> int:
    """``crasmra ARGS``' exit status; the fit parser exits through SystemExit, as on the
    command line."""
    try:
        return run_cli(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def altered(ckpt: dict[str, Any], folder: Path, change: Callable[[dict[str, Any]], None],
            name: str = "altered.ckpt") -> Path:
    """A deep copy of ``ckpt`` with ``change`` applied, saved as ``folder/name``."""
    copy = {k: (json.loads(json.dumps(v)) if k in ("crasmra", "hyper_parameters",
                                                     "datamodule_hyper_parameters") else v)
            for k, v in ckpt.items()}
    change(copy)
    path = folder / name
    torch.save(copy, path)
    return path


def png(path: Path, size: tuple[int, int] = (40, 40), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path
