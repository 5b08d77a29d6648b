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
(``--model.runtime.channels_last``, ``--trainer.precision``).
"""

from __future__ import annotations

from crasmra.cpu.compute import (
    BF16_FLAGS,
    FAMILY_FORMATS,
    ComputePlan,
    FamilyFormat,
    cpu_autocast,
    cpu_bf16_support,
    cpu_flags,
    cpu_flags_summary,
    plan_compute,
)
from crasmra.cpu.cores import IDLE_BELOW, busy_cores, cgroup_cpu_limit, usable_cpus
from crasmra.cpu.threads import (
    CPUPlan,
    add_threads_option,
    apply_cpu_plan,
    configure_cpu,
    keep_freed_memory,
    plan_cpu,
    runs_on_cpu,
)
from crasmra.cpu.threads import (
    log as log,  # the logger commands announce their plan with
)

__all__ = [
    "BF16_FLAGS",
    "FAMILY_FORMATS",
    "IDLE_BELOW",
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

