"""The CPU settings of a run: threads and loader workers, and on the CPU its precision.

They are chosen from the parsed config before the data module starts any worker (see
:mod:`crasmra.cpu`), and logged only once the input has passed every check, so that a bad
input still gets a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crasmra.cpu import CPUPlan, configure_cpu, plan_compute, runs_on_cpu
from crasmra.cpu import log as cpu_log

__all__ = ["CPUChoice", "plan_run_cpu"]


@dataclass(frozen=True)
class CPUChoice:
    """What was chosen for the CPU, to announce when the run starts.

    Attributes:
        plan: The threads and workers; None on an accelerator when nothing was set for it.
        compute_line: The memory format and precision, on the CPU only.
    """

    plan: CPUPlan | None = None
    compute_line: str | None = None

    def announce(self) -> None:
        """Log the choice (one line each for the threads and the precision)."""
        if self.plan is not None:
            cpu_log.info(self.plan.describe())
        if self.compute_line is not None:
            cpu_log.info(self.compute_line)


def plan_run_cpu(config: Any) -> CPUChoice:
    """Apply the CPU plan to ``config`` (a subcommand's section) and this process.

    Threads and loader workers are chosen together (``config.data.num_workers`` is set to the
    plan's); on the CPU the precision comes from :func:`crasmra.cpu.plan_compute` unless the
    config or the command line sets one.
    """
    accelerator = config.trainer.get("accelerator") or "auto"
    device = accelerator if accelerator in ("cpu", "auto") else "cuda"
    plan = configure_cpu(device, config.data.num_workers, config.get("threads"), announce=False)
    config.data.num_workers = plan.workers
    on_cpu = runs_on_cpu(device)
    if not on_cpu:
        # Announced where crasmra was told the threads, not where it chose for an accelerator.
        return CPUChoice(plan if plan.source != "auto" else None)
    # Memory format and precision per backbone and CPU (crasmra.cpu.plan_compute); a
    # precision or channels_last set in the config or on the command line wins.
    compute = plan_compute(str(config.model.net.backbone))
    if config.trainer.get("precision") is None:
        config.trainer.precision = compute.precision
    channels_last = config.model.runtime.get("channels_last")
    line = compute.describe(
        compute.channels_last if channels_last is None else bool(channels_last),
        config.trainer.precision,
    )
    return CPUChoice(plan, line)
