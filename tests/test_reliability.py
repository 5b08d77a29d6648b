"""Reliability: killed runs, non-finite losses, damaged files, full disks and dying DDP workers.

Every test here injects one fault and checks the protection against it; each would fail
without that protection (the comments say how).
"""

from __future__ import annotations

import contextlib
import csv
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import REPO, TESTS, TINY_CONFIG, run_cli, tiny_fit_args
from crasmra.checkpoint import CheckpointError, load_checkpoint_file
from crasmra.engine import CRASMRAModule
from crasmra.files import save_atomic
from reliability_helpers import ForkServer

# ---------------------------------------------------------------------------------------------
# kill -9
# ---------------------------------------------------------------------------------------------


def _assert_loadable(path: Path) -> int:
    """``path`` loads with ``torch.load(weights_only=True)``; returns its epoch."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in floats)
    return int(ckpt["epoch"])


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_save_atomic_survives_kill_during_the_write(tmp_path: Path) -> None:
    """A writer killed half-way through leaves the previous file intact, unlike a plain save."""
    target = tmp_path / "last.ckpt"
    save_atomic({"epoch": 0, "w": torch.zeros(1000)}, target)
    plain = tmp_path / "plain.ckpt"
    torch.save({"epoch": 0, "w": torch.zeros(1000)}, plain)

    for path, writer in ((target, "atomic"), (plain, "plain")):
        marker = tmp_path / f"{writer}.writing"
        pid = os.fork()
        if pid == 0:  # the child stalls half-way through the write and is killed there
            from reliability_helpers import _slow_torch_save

            _slow_torch_save(str(marker))
            new = {"epoch": 1, "w": torch.ones(1000)}
            save_atomic(new, path) if writer == "atomic" else torch.save(new, path)
            os._exit(0)
        _wait_for(marker.exists, 30, f"the {writer} write to start")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    assert load_checkpoint_file(target)["epoch"] == 0
    # The control: the same kill truncates a file written in place, so the check above matters.
    with pytest.raises(CheckpointError):
        load_checkpoint_file(plain)
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1
    save_atomic({"epoch": 2}, target)  # the next write removes the dead write's temporary file
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert load_checkpoint_file(target)["epoch"] == 2


def test_kill_9_during_fit_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """Real ``crasmra fit`` processes killed at seeded random times and once inside a checkpoint
    write: every checkpoint left behind loads, ``--ckpt_path last`` resumes, and the final
    weights equal an uninterrupted run's exactly.

    Only epoch-end checkpoints are written (the default), so whenever the kill falls, the run
    resumes from the last completed epoch and replays the interrupted one with the RNG state
    saved with it: the result is bit-identical on CPU.
    """
    epochs = ("--trainer.max_epochs=2", "--test_after_fit=false")
    server = ForkServer()
    try:
        reference = tmp_path / "reference"
        start = time.monotonic()
        server.start(tiny_fit_args(reference, *epochs), tmp_path / "reference.log")
        assert server.wait() == 0, (tmp_path / "reference.log").read_text()[-3000:]
        duration = time.monotonic() - start

        root = tmp_path / "killed"
        last = root / "checkpoints" / "last.ckpt"
        rng = random.Random(20240607)
        kills: list[str] = []

        def resume_args() -> list[str]:
            # Before the first checkpoint exists the run starts over (a kill can land after
            # metrics.json was written but before last.ckpt was).
            resume = ["--ckpt_path=last"] if last.exists() else ["--overwrite=true"]
            return tiny_fit_args(root, *epochs, *resume)

        # A kill inside a checkpoint write, made deterministic by stalling the write half-way.
        # First, while a checkpoint write is certain to come: after the random kills below the
        # run may already have written its final checkpoint.
        before = _assert_loadable(last) if last.exists() else None
        marker = tmp_path / "writing"
        pid = server.start(resume_args(), tmp_path / "kill-write.log", slow_save_marker=marker)
        _wait_for(marker.exists, 120, "a checkpoint write")
        os.kill(pid, signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        assert list((root / "checkpoints").glob(".*.tmp")), "the kill did not hit the write"
        if before is not None:
            assert _assert_loadable(last) == before

        # One kill in each half of the run (seeded), so both epochs are hit across attempts.
        for attempt, (low, high) in enumerate(((0.15, 0.5), (0.5, 0.95))):
            delay = rng.uniform(low, high) * duration
            log = tmp_path / f"kill{attempt}.log"
            pid = server.start(resume_args(), log)
            time.sleep(delay)
            # A resumed run has less left to do than the reference: it may be done already.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            status = server.wait()
            kills.append(f"{delay:.1f}s -> {status}")
            for ckpt in (last, root / "checkpoints" / "best.ckpt"):
                if ckpt.exists():
                    _assert_loadable(ckpt)

        server.start(resume_args(), tmp_path / "final.log")
        assert server.wait() == 0, (tmp_path / "final.log").read_text()[-3000:]
    finally:
        server.close()

    print(f"uninterrupted run {duration:.1f} s; kills (delay -> exit status): {kills}")
    assert not list((root / "checkpoints").glob(".*.tmp"))
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 1, kills
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0,
                                   msg=f"{key} differs after kills at {kills}")


#: A tiny run whose second epoch cannot improve on its first, on any machine: its heads start
#: imprinted and no step is taken, so both epochs validate the same weights.
FLAT_RUN_ARGS = ("--trainer.max_epochs=2", "--model.finetune.head_init=imprint",
                 "--model.finetune.no_steps_below=1000")


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-epoch tiny run whose best checkpoint is its first epoch and last its second."""
    from crasmra.cli import main

    root = tmp_path_factory.mktemp("flat-run")
    assert main(tiny_fit_args(root, *FLAT_RUN_ARGS)) == 0
    return root


def test_last_checkpoint_follows_every_epoch(flat_run: Path) -> None:
    """last.ckpt is the latest epoch even when validation did not improve (Lightning 2.6 alone
    keeps it at the best epoch)."""
    best = torch.load(flat_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 0
    assert _assert_loadable(flat_run / "checkpoints" / "last.ckpt") == 1


def test_resuming_an_epoch_logged_before_its_checkpoint_logs_it_once(
    flat_run: Path, tmp_path: Path
) -> None:
    """A kill after epoch 1 was logged but before its checkpoint was written: the run resumes
    from epoch 0's checkpoint and replays epoch 1, whose rows must then not appear twice."""
    import csv
    import shutil
    from collections import Counter

    from crasmra.cli import main

    root = tmp_path / "run"
    shutil.copytree(flat_run, root)
    # The state a kill during epoch 1's save leaves: last.ckpt still holds epoch 0.
    shutil.copy(root / "checkpoints" / "best.ckpt", root / "checkpoints" / "last.ckpt")
    assert _assert_loadable(root / "checkpoints" / "last.ckpt") == 0

    def rows(path: Path) -> Counter[tuple[str, str]]:
        with path.open(newline="") as f:
            return Counter((r["epoch"], r["step"]) for r in csv.DictReader(f))

    before = rows(flat_run / "metrics.csv")
    args = tiny_fit_args(root, *FLAT_RUN_ARGS, "--ckpt_path=last")
    assert main(args) == 0
    assert rows(root / "metrics.csv") == before


def test_cli_writes_checkpoints_with_the_atomic_writer(tiny_run: Path) -> None:
    from crasmra.callbacks import AtomicCheckpointIO
    from crasmra.runner import with_atomic_checkpoint_io

    assert any(isinstance(p, AtomicCheckpointIO) for p in with_atomic_checkpoint_io(None))
    # A run leaves no temporary files behind.
    assert not list((tiny_run / "checkpoints").glob(".*"))


# ---------------------------------------------------------------------------------------------
# non-finite loss
# ---------------------------------------------------------------------------------------------
#: Training batches per epoch of the tiny config (24 training images, batch size 8).
STEPS_PER_EPOCH = 3


@pytest.fixture
def nan_at_step(monkeypatch: pytest.MonkeyPatch):
    """Make the training loss non-finite at the given global steps; records parameter sums."""
    state: dict[str, object] = {"steps": set(), "weights": {}}
    original = CRASMRAModule.compute_loss

    def compute_loss(self, output, target):
        total, parts = original(self, output, target)
        if self.training:
            weights = state["weights"]
            params = [p.detach().flatten() for p in self.net.parameters()]
            weights[self.global_step] = torch.cat(params)
            if self.global_step in state["steps"]:
                total = total * float("nan")
                parts = {**parts, "concat_ce": parts.get("concat_ce", total) * float("inf")}
        return total, parts

    monkeypatch.setattr(CRASMRAModule, "compute_loss", compute_loss)

    def arm(*steps: int) -> dict[str, object]:
        state["steps"] = set(steps)
        return state

    return arm


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    nan_at_step, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = STEPS_PER_EPOCH + 1  # epoch 1, batch 1
    nan_at_step(bad)
    code = run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=3"))
    assert code == 1
    err = capsys.readouterr().err
    assert f"global step {bad} (epoch 1, batch 1)" in err and "concat_ce=inf" in err, err
    assert _assert_loadable(tmp_path / "checkpoints" / "last.ckpt") == 0


def test_nonfinite_check_interval_never_checkpoints_bad_weights(
    nan_at_step, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a check every 100 steps, the bad step still stops the run before the epoch-end
    checkpoint: without the check before validation/checkpointing, last.ckpt of epoch 1
    would hold NaN weights."""
    bad = STEPS_PER_EPOCH + 1
    nan_at_step(bad)
    code = run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=3",
                                 "--model.runtime.nonfinite_check_interval=100"))
    assert code == 1
    err = capsys.readouterr().err
    assert f"global step {bad} (epoch 1, batch 1)" in err, err
    assert _assert_loadable(tmp_path / "checkpoints" / "last.ckpt") == 0


def test_nonfinite_check_interval_is_validated(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tiny_fit_args(tmp_path, "--model.runtime.nonfinite_check_interval=0")) == 2
    assert "nonfinite_check_interval" in capsys.readouterr().err


def test_nonfinite_loss_skip_leaves_the_weights_untouched(nan_at_step, tmp_path: Path) -> None:
    bad = STEPS_PER_EPOCH + 1
    state = nan_at_step(bad)
    assert run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=2", "--test_after_fit=false",
                                 "--model.runtime.nonfinite_loss=skip")) == 0
    weights = state["weights"]
    # The weights seen by the step after the bad one are those the bad one saw: no update
    # (returning a NaN loss instead would have made every weight NaN), ...
    torch.testing.assert_close(weights[bad + 1], weights[bad], rtol=0, atol=0)
    # ... while normal steps do update them.
    assert not torch.equal(weights[bad], weights[bad - 1])
    assert _assert_loadable(tmp_path / "checkpoints" / "last.ckpt") == 1
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    skipped = [float(r["train/skipped_batches"]) for r in rows if r.get("train/skipped_batches")]
    assert skipped == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# damaged, foreign and empty files
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_files(folder: Path, good: Path, marker: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {}
    files["truncated"] = folder / "truncated.pth"
    files["truncated"].write_bytes(data[: len(data) // 2])
    tampered = bytearray(data)
    for offset in random.Random(0).sample(range(len(data) // 4, 3 * len(data) // 4), 3):
        tampered[offset] ^= 0xFF  # inside tensor data: torch.load alone would not notice
    files["tampered"] = folder / "tampered.pth"
    files["tampered"].write_bytes(bytes(tampered))
    files["empty"] = folder / "empty.pth"
    files["empty"].write_bytes(b"")
    files["foreign-pickle"] = folder / "foreign-pickle.pth"
    files["foreign-pickle"].write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    files["foreign-torch"] = folder / "foreign-torch.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)},
               files["foreign-torch"])
    return files


BAD_KINDS = ("truncated", "tampered", "empty", "foreign-pickle", "foreign-torch")


@pytest.fixture(scope="module")
def bad_files(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("bad-files")
    marker = folder / "code-was-executed"
    files = _bad_files(folder, tiny_checkpoint, marker)
    # The payloads are live: a plain unpickling would run them (so the assertions below matter).
    pickle.loads(files["foreign-pickle"].read_bytes())
    assert marker.exists()
    marker.unlink()
    return files, marker


def test_tampered_checkpoint_loads_silently_without_the_checksum_check(bad_files) -> None:
    files, _ = bad_files
    torch.load(files["tampered"], weights_only=True)  # no error: the reason for the CRC check
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint_file(files["tampered"])


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("flag", ["--ckpt_path", "--model.runtime.init_from",
                                  "--model.net.pretrained"])
def test_bad_checkpoint_or_weights_file_is_one_clear_error(
    flag: str, kind: str, bad_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files, marker = bad_files
    code = run_cli(tiny_fit_args(tmp_path / "run", f"{flag}={files[kind]}"))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not marker.exists(), "loading the file executed code"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crasmra: error: "), err
    assert str(files[kind]) in err, err
    assert "weights_only set to `False`" not in err  # never advise the unsafe retry
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validate_refuses_a_truncated_checkpoint(bad_files, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    files, _ = bad_files
    code = run_cli(["validate", f"--config={TINY_CONFIG}", f"--trainer.default_root_dir={tmp_path}",
                    f"--ckpt_path={files['truncated']}"])
    assert code == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_damaged_last_checkpoint_is_reported_on_resume(tiny_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", root / "checkpoints")
    last = root / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    assert run_cli(tiny_fit_args(root, "--ckpt_path=last")) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# output folder
# ---------------------------------------------------------------------------------------------
def test_full_disk_is_an_error_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    assert run_cli(tiny_fit_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Not enough free disk space" in err and "MiB" in err, err
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_ddp_run_stops_when_a_worker_dies(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed at its second batch; rank 0 must not wait in the next all-reduce.

    Lightning's launcher (``_ChildProcessObserver``) polls the workers it started every 5 s
    and SIGKILLs the whole group when one has failed; the process-group ``timeout`` bounds
    the wait in the cases it cannot see (e.g. the launching rank dying, other nodes).
    """
    stamp = tmp_path / "death"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           # The test's own callback, from outside the packages a config may name by default.
           "CRASMRA_CLASS_PACKAGES": "reliability_helpers"}
    cmd = [sys.executable, "-m", "crasmra.cli", *tiny_fit_args(
        tmp_path / "ddp", "--trainer.devices=2", "--trainer.max_epochs=3", "--test_after_fit=false",
        "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.timeout=0:00:30",
        "--trainer.callbacks+=reliability_helpers.KillRank",
        "--trainer.callbacks.rank=1", "--trainer.callbacks.at_batch=1",
        f"--trainer.callbacks.stamp={stamp}",
    )]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    ended = time.time()
    assert stamp.exists(), proc.stderr[-3000:]
    assert proc.returncode != 0
    stopped_after = ended - float(stamp.read_text())
    print(f"rank 1 killed; the run exited with {proc.returncode} {stopped_after:.1f} s later")
    assert stopped_after < 30, f"rank 0 took {stopped_after:.1f} s to stop"


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import crasmra.files

    real_save = torch.save
    saves: list[int] = []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 2:  # epoch 0's best.ckpt and last.ckpt fit; epoch 1's do not
            real_save(obj, f, *args, **kwargs)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                               "3145792 vs 3145728")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(crasmra.files.torch, "save", save_until_the_disk_fills)
    code = run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=2", "--test_after_fit=false"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("crasmra: error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0] and "--ckpt_path last" in errors[0]
    monkeypatch.setattr(crasmra.files.torch, "save", real_save)
    assert _assert_loadable(tmp_path / "checkpoints" / "last.ckpt") == 0
    assert not list((tmp_path / "checkpoints").glob(".*"))
