"""The CPU budget of a command: intra-op threads and data-loader workers, planned and applied."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from crasmra.cpu import cores

__all__ = [
    "CPUPlan",
    "add_threads_option",
    "apply_cpu_plan",
    "configure_cpu",
    "keep_freed_memory",
    "plan_cpu",
    "runs_on_cpu",
]

# One logger for the package: commands announce their CPU plan under "crasmra.cpu".
log = logging.getLogger("crasmra.cpu")


@dataclass(frozen=True)
class CPUPlan:
    """Threads and workers chosen for one command.

    Attributes:
        cpus: Usable cores (see :func:`usable_cpus`).
        threads: Intra-op threads of this process (``torch.set_num_threads``).
        workers: Data-loader worker processes.
        source: ``"auto"`` or ``"--threads"``: where ``threads`` came from.
        busy: Cores busy with other work when the plan was made (None: not measured, which
            plans as for a busy machine).
    """

    cpus: int
    threads: int
    workers: int
    source: str = "auto"
    busy: float | None = None

    @property
    def idle_machine(self) -> bool:
        """Whether the plan was made for an idle machine (every core computes)."""
        return self.busy is not None and self.busy < cores.IDLE_BELOW

    def describe(self) -> str:
        """One line for the log."""
        if self.source != "auto":
            how = "set by --threads on"
        elif self.idle_machine:
            how = "chosen for an idle machine (every core computes) with"
        elif self.busy is not None:
            how = (f"chosen for a machine with {self.busy:.1f} core(s) busy with other work "
                   "(a core left free) with")
        else:
            how = "chosen for"
        return (
            f"CPU: {self.threads} intra-op thread(s) and {self.workers} loader worker(s), "
            f"{how} {self.cpus} usable core(s); change with --threads N and the command's "
            "worker option"
        )


def plan_cpu(
    cpus: int, workers: int, threads: int | None = None, busy: float | None = None
) -> CPUPlan:
    """Split ``cpus`` between loader workers and intra-op threads without oversubscribing.

    Args:
        cpus: Usable cores.
        workers: Loader workers asked for (a config value or a command-line option).
        threads: Intra-op threads asked for; None chooses them.
        busy: Cores busy with other work (:func:`busy_cores`); None plans as for a busy
            machine.

    Returns:
        With ``threads=None`` on an idle machine (``busy`` below
        :data:`~crasmra.cpu.cores.IDLE_BELOW`): at most ``cpus // 4`` workers and the other
        cores as threads. Otherwise at most ``cpus // 2`` workers, and ``cpus - workers``
        threads, or ``cpus - 1`` without workers (at least
        one): a core stays free for the main process's Python work and for other jobs, so
        that a competing load slows the run in proportion instead of stalling every parallel
        operator. With ``threads`` given: those threads, and at most ``cpus - threads``
        workers (the threads were asked for; the workers yield).

    Raises:
        ValueError: ``cpus``, ``workers`` or ``threads`` out of range.
    """
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    if workers < 0:
        raise ValueError(f"the number of loader workers must be >= 0, got {workers}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
        return CPUPlan(cpus, threads, min(workers, max(0, cpus - threads)), "--threads", busy)
    if busy is not None and busy < cores.IDLE_BELOW:
        workers = min(workers, cpus // 4)
        return CPUPlan(cpus, max(1, cpus - workers), workers, "auto", busy)
    workers = min(workers, cpus // 2)
    return CPUPlan(cpus, max(1, cpus - max(1, workers)), workers, "auto", busy)


def apply_cpu_plan(plan: CPUPlan, announce: bool = True) -> None:
    """Set torch's intra-op threads to ``plan.threads``; log the plan unless ``announce=False``."""
    import torch

    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    if announce:
        log.info(plan.describe())


def runs_on_cpu(device: str | None) -> bool:
    """Whether a command's ``--device`` (``cpu``, ``cuda:1``, ``auto``...) computes on the CPU."""
    name = "auto" if device is None else str(device).split(":", 1)[0].lower()
    if name == "auto":
        import torch

        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return name == "cpu"


def keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed memory for reuse instead of handing it back at once.

    By default glibc returns every freed block above a dynamic threshold to the kernel (its
    own ``mmap``, or by trimming the heap), so each training step maps its activations afresh
    and pays a page fault, and the zeroing of a page, for every 4 KiB of them: hundreds of
    thousands of faults per step for EfficientNet-Lite0 at batch 16 (BENCHMARKS.md, "The
    allocator"). With blocks up to 1 GiB served from the heap and the heap never trimmed, a
    step reuses the previous step's pages. The process's peak memory is unchanged; what it
    freed stays mapped until it exits. A no-op (False) where the C library is not glibc.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    limit = 1 << 30
    return bool(mallopt(m_trim_threshold, limit)) and bool(mallopt(m_mmap_threshold, limit))


def configure_cpu(
    device: str | None,
    workers: int = 0,
    threads: int | None = None,
    announce: bool = True,
    allocator: bool = True,
) -> CPUPlan:
    """Plan and apply the CPU budget of a command that computes on ``device``.

    On the CPU the threads and workers come from :func:`plan_cpu`. On an accelerator the
    loader workers are left as asked (the host does little arithmetic there) and torch's
    threads change only when ``threads`` is given.

    Args:
        device: The command's device (``"cpu"``, ``"cuda"``, ``"auto"``...).
        workers: Loader workers asked for.
        threads: ``--threads``, or None to choose.
        announce: Log the plan now (a command that may still fail on bad input logs it later
            with ``log.info(plan.describe())``, so that its error stays one line).
        allocator: On the CPU, also keep freed memory for reuse (:func:`keep_freed_memory`);
            False for a long-running server, whose memory should shrink after a burst.

    Returns:
        The plan in force; use its ``workers`` for the data loaders.
    """
    import torch

    cpus = cores.usable_cpus()
    if runs_on_cpu(device):
        plan = plan_cpu(cpus, workers, threads, cores.busy_cores() if threads is None else None)
        if allocator:
            keep_freed_memory()
    elif threads is None:
        return CPUPlan(cpus, torch.get_num_threads(), workers)
    else:
        # plan_cpu validates the threads; the workers stay as asked.
        plan = CPUPlan(cpus, plan_cpu(cpus, 0, threads).threads, workers, "--threads")
    apply_cpu_plan(plan, announce)
    return plan


def add_threads_option(parser: Any) -> None:
    """Add ``--threads N`` to an argparse (sub)parser."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="intra-op CPU threads (default: chosen from the usable cores so that threads and "
        "loader workers do not oversubscribe them; see BENCHMARKS.md)",
    )
