"""The non-finite-loss guard: stop on a NaN/Inf training loss, or skip its batch.

A small module owned by the training module (its buffers follow the device; they are not
persistent, so checkpoints are unchanged): :meth:`NonFiniteGuard.after_loss` sees every
training loss, :meth:`NonFiniteGuard.check` runs before validation and before any checkpoint
is written, so a checkpoint never holds weights updated with a non-finite loss.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from crasmra.errors import CrasmraError

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(CrasmraError, FloatingPointError):
    """Raised when the training loss becomes NaN or infinite and the policy is ``"stop"``.

    The run failed rather than its input, hence exit status 1.
    """

    exit_code = 1

    def one_line(self) -> str:
        return f"training stopped: {super().one_line()}"


def _describe(parts: dict[str, Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


def _error(step: int, epoch: int, batch_idx: int, terms: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"Non-finite training loss at global step {step} (epoch {epoch}, batch {batch_idx}): "
        f"{terms}. The last good checkpoint is kept. Lower the learning rates, use "
        "--trainer.gradient_clip_val, or set --model.runtime.nonfinite_loss skip to skip such "
        "batches."
    )


class NonFiniteGuard(nn.Module):
    """What to do about a non-finite training loss (``--model.runtime.nonfinite_loss``).

    Args:
        policy: ``"stop"`` raises :class:`NonFiniteLossError` naming the step and the loss
            terms; ``"skip"`` skips that batch's optimiser step and counts it. Under DDP the
            ranks agree, so all of them skip together.
        check_interval: With ``"stop"``, how often (in batches) the loss is read on the host;
            1 checks every batch before its update. N > 1 avoids a host-device
            synchronisation per step: a device-side flag remembers the first non-finite loss
            and is read every N batches and at every :meth:`check`.
    """

    def __init__(self, policy: str = "stop", check_interval: int = 1) -> None:
        super().__init__()
        self.policy = policy
        self.check_interval = check_interval
        # Counted on the device so that the training step never synchronises with the host.
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long),
                             persistent=False)
        # First non-finite loss since the last host-side check: global step, epoch and batch
        # index (-1: none), and the loss terms at that step.
        self.register_buffer("first_at", torch.full((3,), -1, dtype=torch.long),
                             persistent=False)
        self._terms: Tensor | None = None
        self._names: tuple[str, ...] = ()
        self._since_check = 0
        self._skipped_at_epoch_start = 0

    def after_loss(self, total: Tensor, parts: dict[str, Tensor], step: int, epoch: int,
                   batch_idx: int, world_size: int = 1) -> bool:
        """Look at one training loss; return whether its batch must be skipped.

        Raises:
            NonFiniteLossError: The loss is not finite and the policy is ``"stop"`` (at once,
                or at the next read of the device-side flag).
        """
        finite = torch.isfinite(total)
        if self.policy == "skip":
            if world_size > 1 and torch.distributed.is_initialized():
                # Every rank must take the same decision: a rank that skips its backward while
                # the others run theirs would leave DDP's gradient all-reduce waiting forever.
                agreed = finite.to(torch.int32)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
                finite = agreed.bool()
            # Deciding to skip needs the value on the host; this sync happens only under "skip".
            if not bool(finite):
                self.skipped_batches += 1
                log.warning("Skipping batch %d of step %d: non-finite loss %s", batch_idx, step,
                            _describe(parts))
                return True
        elif self.check_interval == 1:
            if not bool(finite):
                raise _error(step, epoch, batch_idx, _describe(parts))
        else:
            self._remember(finite, parts, step, epoch, batch_idx)
            self._since_check += 1
            if self._since_check >= self.check_interval:
                self.check()
        return False

    def _remember(self, finite: Tensor, parts: dict[str, Tensor], step: int, epoch: int,
                  batch_idx: int) -> None:
        """Record on the device, without a sync, the first non-finite loss since the last check."""
        terms = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
        if self._terms is None or self._terms.shape != terms.shape:
            self._terms = torch.zeros_like(terms)
            self._names = tuple(parts)
        at = self.first_at
        first = ~finite & (at[0] < 0)
        # masked_fill takes the Python ints as kernel arguments: no host-to-device copy.
        self.first_at = torch.stack([at[0].masked_fill(first, step),
                                     at[1].masked_fill(first, epoch),
                                     at[2].masked_fill(first, batch_idx)])
        self._terms = torch.where(first, terms, self._terms)

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was recorded since the last
        check (one host-device synchronisation; nothing to do unless ``check_interval > 1``)."""
        self._since_check = 0
        if self._terms is None:
            return
        step, epoch, batch_idx = (int(v) for v in self.first_at.tolist())
        if step < 0:
            return
        terms = ", ".join(f"{name}={float(v):.4g}"
                          for name, v in zip(self._names, self._terms.tolist(), strict=True))
        raise _error(step, epoch, batch_idx, terms)

    def epoch_start(self) -> None:
        """Start counting the epoch's skipped batches."""
        self._skipped_at_epoch_start = int(self.skipped_batches)

    def skipped_this_epoch(self) -> int:
        """Batches skipped since :meth:`epoch_start`."""
        return int(self.skipped_batches) - self._skipped_at_epoch_start
