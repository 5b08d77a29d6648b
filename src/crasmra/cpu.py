"""CPU budget: how many intra-op threads and data-loader workers a command may use.

PyTorch starts one intra-op thread per visible core and knows nothing of the loader worker
processes, of the process's CPU affinity beyond its own start-up, or of a container's CPU
quota. On a small machine that oversubscribes the cores: two OpenMP threads plus a loader
worker on two cores already contend, and once another job runs, every parallel operator waits
at its barrier for a thread that the scheduler has put aside. Training then slows down by an
order of magnitude instead of by the factor of the competing load. A single thread per
process, with the loader in its own process, degrades in proportion to the load.

The rule (:func:`plan_cpu`): the usable cores are the affinity mask capped by the cgroup CPU
quota. On an idle machine (less than half a core busy with other work when the command
starts, :func:`busy_cores`) every core computes: loader workers get a quarter of the cores
(none on two or three: decoding a batch costs a few percent of a CPU training step, less than
a core left to the loader wastes) and intra-op threads the rest. On a busy machine, loader
workers get at most half of the cores and the threads the cores the workers leave, less one
when there are no workers (that core stays free for the main process's Python work and for
the other jobs), so that the competing load slows the run in proportion. Both numbers can be
set explicitly (``--threads``, ``--data.num_workers`` or the command's ``--num-workers``).

The arithmetic (:func:`plan_compute`): the memory format and the precision that train a
backbone fastest on this CPU, from a table per backbone family measured with
``benchmarks/cpu_formats.py`` (BENCHMARKS.md, "CPU memory format and precision"). bf16
autocast is chosen only where the CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere
oneDNN emulates it at a fraction of fp32's speed. Both can be set explicitly
(``--model.channels_last``, ``--trainer.precision``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BF16_FLAGS",
    "FAMILY_FORMATS",
    "CPUPlan",
    "ComputePlan",
    "FamilyFormat",
    "add_threads_option",
    "apply_cpu_plan",
    "busy_cores",
    "cgroup_cpu_limit",
    "configure_cpu",
    "cpu_autocast",
    "cpu_bf16_support",
    "cpu_flags",
    "cpu_flags_summary",
    "keep_freed_memory",
    "plan_compute",
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


#: Cores busy with other work below which the machine counts as idle (:func:`plan_cpu`).
IDLE_BELOW = 0.5


def _cpu_times(stat: Path) -> tuple[int, int, int] | None:
    """(busy, total, cpus) jiffies of the machine from ``/proc/stat``."""
    text = _read(stat)
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
        return self.busy is not None and self.busy < IDLE_BELOW

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
        With ``threads=None`` on an idle machine (``busy`` below :data:`IDLE_BELOW`): at most
        ``cpus // 4`` workers and the other cores as threads. Otherwise at most ``cpus // 2``
        workers, and ``cpus - workers`` threads, or ``cpus - 1`` without workers (at least
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
    if busy is not None and busy < IDLE_BELOW:
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

    cpus = usable_cpus()
    if runs_on_cpu(device):
        plan = plan_cpu(cpus, workers, threads, busy_cores() if threads is None else None)
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


# ------------------------------------------------------------------------------------------
# memory format and precision
# ------------------------------------------------------------------------------------------
#: /proc/cpuinfo flags of a CPU that computes bf16 natively (oneDNN's bf16 kernels).
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read.

    Read once per file and process: the plan is consulted per batch by ``predict`` and
    ``report``, and a CPU's flags do not change while it runs.
    """
    return _flags_in(str(cpuinfo))


@functools.lru_cache(maxsize=8)
def _flags_in(cpuinfo: str) -> frozenset[str]:
    text = _read(Path(cpuinfo)) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_support(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16).

    Args:
        flags: The CPU's flags; None reads them (:func:`cpu_flags`).
    """
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def cpu_flags_summary(flags: frozenset[str] | None = None) -> str:
    """The flags that decide the plan, e.g. ``"avx2 avx512f avx512_bf16 amx_bf16"``."""
    flags = cpu_flags() if flags is None else flags
    wanted = ("avx2", "avx512f", "avx512_vnni", *BF16_FLAGS, "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


@dataclass(frozen=True)
class FamilyFormat:
    """What pays for one backbone family on a CPU (measured, BENCHMARKS.md).

    Attributes:
        name: The family, as the log names it.
        prefixes: timm model-name prefixes of the family.
        channels_last_fp32: Channels-last is faster than NCHW in fp32 (any x86 CPU).
        bf16: bf16 autocast is faster than fp32 where the CPU has native bf16.
        channels_last_bf16: Channels-last is faster than NCHW under bf16 autocast.
    """

    name: str
    prefixes: tuple[str, ...]
    channels_last_fp32: bool
    bf16: bool
    channels_last_bf16: bool


#: Per family, from ``benchmarks/cpu_formats.py`` on an AVX2 CPU (AMD EPYC) and on an
#: AVX-512/AMX Xeon (BENCHMARKS.md). The first family whose prefix matches decides; a backbone
#: of no listed family keeps NCHW fp32. ConvNeXt: channels-last 0.96-1.03x on the EPYC.
FAMILY_FORMATS: tuple[FamilyFormat, ...] = (
    FamilyFormat(
        "EfficientNet/MobileNet (depthwise)",
        ("tf_efficientnet", "efficientnet", "mobilenet", "tf_mobilenet", "mnasnet", "lcnet",
         "fbnet", "ghostnet", "tinynet", "mixnet", "tf_mixnet"),
        channels_last_fp32=True, bf16=False, channels_last_bf16=True,
    ),
    # Bottleneck ResNets gain from channels-last in fp32 (resnet50: 1.09-1.12x on an AVX2 EPYC,
    # 1.27x on an AVX-512 Xeon); the small basic-block ones do not reliably (resnet10t at the
    # demo's 56 px: 1.05-1.17x on the EPYC, 0.93x on the Xeon).
    FamilyFormat(
        "ResNet (bottleneck)",
        ("resnet50", "resnet101", "resnet152", "resnet200", "resnext", "wide_resnet",
         "seresnet50", "seresnet101", "seresnet152", "seresnext", "resnetrs", "ecaresnet50",
         "ecaresnet101", "resnest", "res2net"),
        channels_last_fp32=True, bf16=True, channels_last_bf16=True,
    ),
    FamilyFormat(
        "ResNet",
        ("resnet", "seresnet", "ecaresnet", "skresnet"),
        channels_last_fp32=False, bf16=True, channels_last_bf16=True,
    ),
    FamilyFormat(
        "DenseNet", ("densenet",),
        channels_last_fp32=False, bf16=True, channels_last_bf16=True,
    ),
    FamilyFormat(
        "ConvNeXt", ("convnext",),
        channels_last_fp32=False, bf16=True, channels_last_bf16=True,
    ),
)


def _family(backbone: str) -> FamilyFormat | None:
    name = backbone.split(".", 1)[0].lower()
    matches = [f for f in FAMILY_FORMATS for p in f.prefixes if name.startswith(p)]
    return matches[0] if matches else None


@dataclass(frozen=True)
class ComputePlan:
    """Memory format and precision for one backbone on this CPU.

    Attributes:
        backbone: The timm model name.
        channels_last: Run the network in channels-last memory format.
        precision: Lightning precision, ``"32-true"`` or ``"bf16-mixed"``.
        family: The family row that decided it (None: not listed, NCHW fp32).
        native_bf16: Whether the CPU computes bf16 natively.
        flags: :func:`cpu_flags_summary` of the CPU.
    """

    backbone: str
    channels_last: bool
    precision: str
    family: str | None
    native_bf16: bool
    flags: str

    @property
    def bf16(self) -> bool:
        """Whether the plan computes under bf16 autocast."""
        return self.precision.startswith("bf16")

    def describe_choice(self) -> str:
        """E.g. ``"channels_last fp32"``."""
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{layout} {'bf16' if self.bf16 else 'fp32'}"

    def describe(self, channels_last: bool | None = None, precision: str | None = None) -> str:
        """One line for the log; ``channels_last``/``precision`` as actually set, if given."""
        chosen_cl = self.channels_last if channels_last is None else channels_last
        chosen_precision = self.precision if precision is None else str(precision)
        overridden = (chosen_cl, chosen_precision) != (self.channels_last, self.precision)
        family = self.family or "no measured family"
        cpu = f"{'native' if self.native_bf16 else 'no native'} bf16 ({self.flags})"
        how = "set on the command line or in the config" if overridden else "chosen"
        return (
            f"CPU compute: {'channels_last' if chosen_cl else 'NCHW'}, precision "
            f"{chosen_precision}, {how} for {self.backbone} ({family}; CPU with {cpu}); change "
            "with --model.channels_last and --trainer.precision"
        )


def plan_compute(backbone: str, flags: frozenset[str] | None = None) -> ComputePlan:
    """The fastest measured memory format and precision for ``backbone`` on this CPU.

    Args:
        backbone: timm model name (a pretrained tag after a dot is ignored).
        flags: The CPU's flags; None reads them (:func:`cpu_flags`).

    Returns:
        bf16 autocast only where the family gains from it and the CPU has native bf16; the
        memory format that is fastest in the chosen precision. A backbone of no listed family
        keeps NCHW fp32 (the behaviour of a plain PyTorch run).
    """
    flags = cpu_flags() if flags is None else flags
    native = cpu_bf16_support(flags)
    family = _family(backbone)
    if family is None:
        channels_last, bf16 = False, False
    else:
        bf16 = native and family.bf16
        channels_last = family.channels_last_bf16 if bf16 else family.channels_last_fp32
    return ComputePlan(
        backbone=backbone,
        channels_last=channels_last,
        precision="bf16-mixed" if bf16 else "32-true",
        family=family.name if family else None,
        native_bf16=native,
        flags=cpu_flags_summary(flags),
    )


def cpu_autocast(enabled: bool) -> Any:
    """bf16 autocast on the CPU when ``enabled`` (as Lightning's ``bf16-mixed``), else a no-op."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
