"""CPU budget: how many intra-op threads and data-loader workers a command may use.

PyTorch starts one intra-op thread per visible core and knows nothing of the loader worker
processes, of the process's CPU affinity beyond its own start-up, or of a container's CPU
quota. On a small machine that oversubscribes the cores: two OpenMP threads plus a loader
worker on two cores already contend, and once another job runs, every parallel operator waits
at its barrier for a thread that the scheduler has put aside. Training then slows down by an
order of magnitude instead of by the factor of the competing load. A single thread per
process, with the loader in its own process, degrades in proportion to the load.

The rule (:func:`plan_cpu`): the usable cores are the affinity mask capped by the cgroup CPU
quota; loader workers get at most half of them; the intra-op threads get the cores the workers
leave, less one when there are no workers (that core stays free for the main process's Python
work and for whatever else runs on the machine). Both numbers can be set explicitly
(``--threads``, ``--data.num_workers`` or the command's ``--num-workers``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CPUPlan",
    "add_threads_option",
    "apply_cpu_plan",
    "cgroup_cpu_limit",
    "configure_cpu",
    "plan_cpu",
    "runs_on_cpu",
    "usable_cpus",
]

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Folders of this process's cgroup and its ancestors, innermost first (v1 and v2)."""
    text = _read(proc_cgroup) or ""
    dirs: list[Path] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel_path = Path(rel.lstrip("/"))
        if controllers == "":  # v2: one unified hierarchy
            base = root
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy
            names = (controllers, "cpu,cpuacct", "cpu")
            base = next((root / n for n in names if (root / n).is_dir()), root / "cpu")
        else:
            continue
        chain = [rel_path, *rel_path.parents]
        dirs.extend(base / p for p in chain)
    return dirs


def cgroup_cpu_limit(
    root: str | Path = _CGROUP_ROOT, proc_cgroup: str | Path = "/proc/self/cgroup"
) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None when unlimited.

    Reads cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000") or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` along the process's cgroup path and its
    ancestors; the tightest limit wins.

    Args:
        root: Where the cgroup filesystem is mounted.
        proc_cgroup: The process's cgroup membership file.
    """
    root, proc_cgroup = Path(root), Path(proc_cgroup)
    limits: list[float] = []
    for folder in _own_cgroup_dirs(root, proc_cgroup):
        v2 = _read(folder / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
            continue
        quota_v1 = _read(folder / "cpu.cfs_quota_us")
        period_v1 = _read(folder / "cpu.cfs_period_us")
        # v1 writes -1 for "no quota".
        if (
            quota_v1
            and period_v1
            and quota_v1.isdigit()
            and period_v1.isdigit()
            and int(quota_v1) > 0
            and int(period_v1) > 0
        ):
            limits.append(int(quota_v1) / int(period_v1))
    return min(limits) if limits else None


def usable_cpus() -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup CPU quota.

    A fractional quota is rounded up (1.5 cores allow two threads to make progress).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


@dataclass(frozen=True)
class CPUPlan:
    """Threads and workers chosen for one command.

    Attributes:
        cpus: Usable cores (see :func:`usable_cpus`).
        threads: Intra-op threads of this process (``torch.set_num_threads``).
        workers: Data-loader worker processes.
        source: ``"auto"`` or ``"--threads"``: where ``threads`` came from.
    """

    cpus: int
    threads: int
    workers: int
    source: str = "auto"

    def describe(self) -> str:
        """One line for the log."""
        how = "chosen for" if self.source == "auto" else "set by --threads on"
        return (
            f"CPU: {self.threads} intra-op thread(s) and {self.workers} loader worker(s), "
            f"{how} {self.cpus} usable core(s); change with --threads N and the command's "
            "worker option"
        )


def plan_cpu(cpus: int, workers: int, threads: int | None = None) -> CPUPlan:
    """Split ``cpus`` between loader workers and intra-op threads without oversubscribing.

    Args:
        cpus: Usable cores.
        workers: Loader workers asked for (a config value or a command-line option).
        threads: Intra-op threads asked for; None chooses them.

    Returns:
        With ``threads=None``: at most ``cpus // 2`` workers, and ``cpus - workers`` threads,
        or ``cpus - 1`` without workers (at least one): a core stays free for the main
        process's Python work and for other jobs, so that a competing load slows the run in
        proportion instead of stalling every parallel operator. With ``threads`` given: those
        threads, and at most ``cpus - threads`` workers (the threads were asked for; the
        workers yield).

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
        return CPUPlan(cpus, threads, min(workers, max(0, cpus - threads)), "--threads")
    workers = min(workers, cpus // 2)
    return CPUPlan(cpus, max(1, cpus - max(1, workers)), workers)


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


def configure_cpu(
    device: str | None, workers: int = 0, threads: int | None = None, announce: bool = True
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

    Returns:
        The plan in force; use its ``workers`` for the data loaders.
    """
    import torch

    cpus = usable_cpus()
    if runs_on_cpu(device):
        plan = plan_cpu(cpus, workers, threads)
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
