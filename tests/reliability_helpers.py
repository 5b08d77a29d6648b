"""Test-only helpers for the reliability tests: fault-injecting callbacks and a fork server.

Importable from subprocesses that have ``tests/`` on ``PYTHONPATH`` (``--trainer.callbacks+=
reliability_helpers.KillRank``), and runnable as ``python tests/reliability_helpers.py`` to start
a :class:`ForkServer` child.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import lightning as L

HERE = Path(__file__).resolve().parent


class KillRank(L.Callback):
    """SIGKILL this process at training batch ``at_batch`` when its global rank is ``rank``.

    Writes the time of death (``time.time()``) to ``stamp`` first, so a test can measure how
    long the surviving processes take to stop.
    """

    def __init__(self, rank: int = 1, at_batch: int = 1, stamp: str = "") -> None:
        self.rank = rank
        self.at_batch = at_batch
        self.stamp = stamp

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.at_batch:
            if self.stamp:
                Path(self.stamp).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """SIGKILL this process at training batch ``batch`` of epoch ``epoch`` (a ``kill -9``
    landing at a known point of a run)."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def _slow_torch_save(marker: str) -> None:
    """Make every ``torch.save`` to a file stall half-way, after creating ``marker``.

    Gives a test a wide, deterministic window in which to ``kill -9`` a process in the middle
    of writing a checkpoint, whatever the writer does around ``torch.save``.
    """
    import torch

    real_save = torch.save

    def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        owned = isinstance(f, str | os.PathLike)
        handle: IO[bytes] = open(f, "wb") if owned else f  # noqa: SIM115 (closed below)
        try:
            handle.write(data[: len(data) // 2])
            handle.flush()
            Path(marker).write_text("writing")
            time.sleep(120)
            handle.write(data[len(data) // 2:])
        finally:
            if owned:
                handle.close()

    torch.save = slow_save


class ForkServer:
    """Start ``crasmra fit`` runs as forked children of one process that has imported everything.

    A fresh ``python -m crasmra.cli`` spends most of its time importing torch, timm and
    Lightning; forking a warm process runs the very same ``crasmra.cli.main`` in a real,
    separate process (which can be ``kill -9``ed) for a fraction of the cost.
    """

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env, cwd=HERE.parent,
        )
        assert self._read() == {"ready": True}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def start(self, argv: list[str], log: Path, slow_save_marker: Path | None = None) -> int:
        """Fork a child running ``crasmra.cli.main(argv)``; returns its pid."""
        assert self.proc.stdin is not None
        request = {"argv": argv, "log": str(log),
                   "slow_save_marker": str(slow_save_marker) if slow_save_marker else None}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self._read()["pid"])

    def wait(self) -> int:
        """The child's exit status: its exit code, or minus the signal that killed it."""
        return int(self._read()["status"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _serve() -> None:
    """The fork server's loop: one JSON request per stdin line, one child at a time."""
    import torch

    import crasmra.cli
    import crasmra.data
    import crasmra.engine

    # The same numerics as the test process (see conftest._fast_cpu_math).
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if request["slow_save_marker"]:
                    _slow_torch_save(request["slow_save_marker"])
                code = crasmra.cli.main(request["argv"])
            except SystemExit as exit_:  # argument errors exit through argparse
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _serve()
