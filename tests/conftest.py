"""Shared fixtures: tiny training runs through the real command line."""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY_CONFIG = TESTS / "configs" / "tiny.yaml"


def _let_lightning_read_mutated_constructors() -> None:
    """Make ``save_hyperparameters`` work on constructors that mutmut has renamed.

    Lightning finds the constructor's arguments by looking for a calling frame whose code is
    named ``__init__``; mutmut runs ``__init__`` as ``xǁClassǁ__init____mutmut_N``, so every
    engine test would fail under mutation testing without this. Active only under mutmut.
    """
    from lightning.pytorch.utilities import parsing

    original = parsing._get_init_args

    def get_init_args(frame: types.FrameType) -> tuple:
        if "ǁ__init____mutmut" not in frame.f_code.co_name:
            return original(frame)
        renamed = types.SimpleNamespace(
            f_code=frame.f_code.replace(co_name="__init__"),
            f_locals=frame.f_locals,
            f_back=frame.f_back,
        )
        return original(renamed)

    parsing._get_init_args = get_init_args


if "MUTANT_UNDER_TEST" in os.environ:
    _let_lightning_read_mutated_constructors()


@pytest.fixture(autouse=True, scope="session")
def _fast_cpu_math() -> None:
    """One intra-op thread and flushed denormals: tiny tensors on a shared 2-core machine run
    many times faster this way (thread hand-offs and the denormal values of randomly
    initialised deep nets otherwise dominate)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def tiny_fit_args(root: Path, *extra: str) -> list[str]:
    """Arguments of `crasmra fit` for a seconds-long run into ``root``."""
    return ["fit", f"--config={TINY_CONFIG}", f"--trainer.default_root_dir={root}", *extra]


def run_cli(args: Sequence[str]) -> int:
    from crasmra.cli import main

    return main(list(args))


def _trained_run(factory: pytest.TempPathFactory, name: str, *extra: str) -> Path:
    """A run folder of a tiny fit through the command line, with its checkpoints."""
    root = factory.mktemp(name)
    assert run_cli(tiny_fit_args(root, *extra)) == 0
    assert (root / "checkpoints" / "best.ckpt").is_file()
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with best/last checkpoints of a two-epoch tiny fit, trained once per session."""
    return _trained_run(tmp_path_factory, "tiny-run", "--trainer.max_epochs=2")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    """The best checkpoint of :func:`tiny_run`."""
    return tiny_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a one-epoch tiny fit of the ``plain`` variant (timm's own classifier)."""
    return _trained_run(tmp_path_factory, "plain-run", "--model.net.variant=plain")


@pytest.fixture(scope="session")
def plain_checkpoint(plain_run: Path) -> Path:
    """The best checkpoint of :func:`plain_run`."""
    return plain_run / "checkpoints" / "best.ckpt"


def build_module(**options: Any) -> Any:
    """The training module, each option (named as its flag's last component, e.g. ``omega``,
    ``lr_heads``) given in its typed part."""
    import dataclasses

    from crasmra.engine import CRASMRAModule, FinetuneConfig, OptimConfig, RuntimeConfig
    from crasmra.losses import LossWeights
    from crasmra.model import NetConfig

    kinds = {"net": NetConfig, "loss": LossWeights, "optim": OptimConfig,
             "finetune": FinetuneConfig, "runtime": RuntimeConfig}
    part_of = {f.name: part for part, kind in kinds.items() for f in dataclasses.fields(kind)}
    parts: dict[str, dict[str, Any]] = {part: {} for part in kinds}
    rest: dict[str, Any] = {}
    for key, value in options.items():
        if key in kinds and isinstance(value, dict):  # a part given whole, e.g. net={...}
            parts[key].update(value)
        elif key in part_of:
            parts[part_of[key]][key] = value
        else:
            rest[key] = value
    typed = {name: kind(**parts[name]) for name, kind in kinds.items()}
    return CRASMRAModule(**typed, **rest)
