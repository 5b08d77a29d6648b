"""The cores a process may use (affinity and cgroup quota) and how busy the machine is."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["IDLE_BELOW", "busy_cores", "cgroup_cpu_limit", "read_file", "usable_cpus"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def read_file(path: Path) -> str | None:
    """The stripped text of a small system file, or None where it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Folders of this process's cgroup and its ancestors, innermost first (v1 and v2)."""
    text = read_file(proc_cgroup) or ""
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
        v2 = read_file(folder / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
            continue
        quota_v1 = read_file(folder / "cpu.cfs_quota_us")
        period_v1 = read_file(folder / "cpu.cfs_period_us")
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


#: Cores busy with other work below which the machine counts as idle (:func:`plan_cpu`).
IDLE_BELOW = 0.5


def _cpu_times(stat: Path) -> tuple[int, int, int] | None:
    """(busy, total, cpus) jiffies of the machine from ``/proc/stat``."""
    text = read_file(stat)
    if not text:
        return None
    lines = text.splitlines()
    fields = lines[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    try:
        values = [int(v) for v in fields[1:]]
    except ValueError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return sum(values) - idle, sum(values), max(1, cpus)


def busy_cores(interval: float = 0.25, stat: str | Path = "/proc/stat") -> float | None:
    """How many cores other work keeps busy right now, sampled over ``interval`` seconds.

    This process sleeps while it samples, so what is busy is the rest of the machine. None
    where ``/proc/stat`` cannot be read (not Linux).
    """
    import time

    stat = Path(stat)
    first = _cpu_times(stat)
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times(stat)
    if second is None:
        return None
    busy, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return busy / total * second[2]
