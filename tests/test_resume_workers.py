"""Resume with loader workers (issue 24, item 13): a run killed with ``kill -9`` and resumed
ends with the uninterrupted run's weights, and ``last.ckpt`` always holds the final step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, TESTS, run_cli, tiny_fit_args


# ---------------------------------------------------------------------------------------------
# 13. resume
# ---------------------------------------------------------------------------------------------
class _RandomItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(1)  # what a random crop or flip draws, in the worker


def _epoch_values(loader: Any, sampler: Any, epochs: list[int]) -> list[list[float]]:
    values = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        values.append(sorted(float(x) for batch in loader for x in batch.flatten()))
    return values


@pytest.mark.parametrize("workers", [1, 2])
def test_persistent_workers_draw_what_fresh_workers_would(workers: int) -> None:
    from torch.utils.data import DataLoader

    from crasmra.data.sampling import EpochSeededDataset, EpochShuffleSampler

    def loader(persistent: bool) -> tuple[DataLoader, EpochShuffleSampler]:
        generator = torch.Generator().manual_seed(0)
        sampler = EpochShuffleSampler(8, seed=0, generator=generator)
        return DataLoader(EpochSeededDataset(_RandomItems()), batch_size=2, sampler=sampler,
                          generator=generator, num_workers=workers,
                          persistent_workers=persistent), sampler

    continued = _epoch_values(*loader(True), [0, 1, 2])
    fresh = _epoch_values(*loader(False), [2])
    assert continued[2] == fresh[0]
    assert continued[1] != continued[2]


def test_last_checkpoint_holds_the_final_step(tmp_path: Path) -> None:
    # 3 steps per epoch, 2 epochs: save points at step 4 only, then the final step 6.
    assert run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=2", "--test_after_fit=false",
                                 "--checkpoint.every_n_train_steps=4")) == 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert last["global_step"] == 6


def _fit(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "CRASMRA_CLASS_PACKAGES": "reliability_helpers",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "crasmra.cli", *tiny_fit_args(
        root, "--trainer.max_epochs=2", "--test_after_fit=false", "--data.num_workers=1",
        "--data.random_crop=true", "--data.resize_size=80", *extra)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=200)


@pytest.mark.timeout(300)
def test_kill_9_with_a_loader_worker_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """One persistent loader worker (the default), random crops and flips: killed in the
    second epoch, resumed from the first epoch's checkpoint, the run ends with the weights of
    the uninterrupted one, bit for bit."""
    assert _fit(tmp_path / "whole").returncode == 0
    killed = _fit(tmp_path / "killed", "--trainer.callbacks+=reliability_helpers.KillAt",
                  "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _fit(tmp_path / "killed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole, again = (torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu",
                               weights_only=True) for root in (tmp_path / "whole",
                                                               tmp_path / "killed"))
    assert whole["global_step"] == again["global_step"] == 6
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key], value, rtol=0, atol=0, msg=key)
