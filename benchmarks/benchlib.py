"""Shared helpers of the benchmark scripts: devices, precision, timing, memory and tables.

Timing protocol: every candidate is warmed up, then the candidates are run in turn (A, B, C,
A, B, C, ...) for several rounds and each one's median per-call time is reported. Alternating
keeps slow drifts of a shared machine (other jobs, thermal or frequency changes) from
favouring whichever candidate happened to run first, and ratios taken between candidates of
the same round tolerate such load better than absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "Candidate",
    "autocast",
    "count_flops",
    "count_params",
    "environment",
    "markdown_table",
    "peak_memory_mb",
    "pick_device",
    "synchronize",
    "time_alternating",
]


def add_model_timing_args(
    parser: argparse.ArgumentParser, *, warmup: int, iters: int, rounds: int = 5
) -> None:
    """The options every per-part benchmark script shares: model, input, precision, timing."""
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--peak-tflops", type=float, default=None)


def pick_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``dtype="bf16"`` (as Lightning's ``bf16-mixed``), else a no-op."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype != "fp32":
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    return contextlib.nullcontext()


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` under no_grad (2 per multiply-add; matmuls and convs only)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


@dataclass
class Candidate:
    """One thing to time: ``fn`` runs one call (a training step, a forward pass...).

    Attributes:
        name: Row label.
        fn: The call to time; must leave its work queued on ``device`` at most.
        items: Images processed per call (for images/s).
        flops: Model FLOPs per call (for achieved TFLOP/s and MFU); 0 if unknown.
        times: Seconds per call, one entry per round (filled by :func:`time_alternating`).
        extra: Free-form values reported next to the timings.
    """

    name: str
    fn: Callable[[], object]
    items: int = 1
    flops: float = 0.0
    times: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median seconds per call over the rounds."""
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds: how noisy the figure is."""
        return (max(self.times) - min(self.times)) / self.median if self.times else 0.0


def time_alternating(
    candidates: Sequence[Candidate],
    device: torch.device,
    *,
    warmup: int = 1,
    iters: int = 3,
    rounds: int = 5,
    log: Callable[[str], None] | None = None,
) -> None:
    """Fill ``c.times`` with seconds per call: ``rounds`` interleaved rounds of ``iters`` calls."""
    for c in candidates:
        for _ in range(warmup):
            c.fn()
        synchronize(device)
        if log:
            log(f"  warmed up {c.name}")
    for r in range(rounds):
        for c in candidates:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                c.fn()
            synchronize(device)
            c.times.append((time.perf_counter() - start) / iters)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{c.name} {c.times[-1] * 1e3:.1f} ms" for c in candidates))


def _rss_probe(code: str) -> float:
    """Run ``code`` in a fresh interpreter; it prints the peak-RSS growth (MB) it measured."""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def peak_memory_mb(
    build: str, run: str, device: torch.device, calls: int = 2, *, in_process: Any = None
) -> float:
    """Peak memory of ``run`` beyond what ``build`` already holds, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` around ``in_process()`` (a callable), in this
    process. CPU: there is no allocator counter and the resident-set high-water mark cannot be
    reset, so ``build`` and ``run`` (Python source) run in a fresh interpreter and the growth
    of its high-water mark over ``calls`` calls of ``run`` is reported: activations, gradients
    and optimiser state, not the weights. The mark is read from ``/proc/self/status`` (VmHWM,
    per address space): ``ru_maxrss`` survives ``exec`` and would start at this process's peak.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(calls):
            in_process()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(_here())!r})\n"
        "from benchlib import rss_high_water_mb\n"
        f"{build}\n"
        "before = rss_high_water_mb()\n"
        f"for _ in range({calls}):\n"
        f"    {run}\n"
        "print(rss_high_water_mb() - before)\n"
    )
    return _rss_probe(code)


def _here() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent)


def rss_high_water_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux VmHWM; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment(device: torch.device) -> dict[str, str]:
    """Hardware and library versions, for the report."""
    import lightning
    import timm
    import torchvision

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "torch threads": str(torch.get_num_threads()),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            for line in lscpu.splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("Model name", "CPU(s)"):
                    info[key.strip()] = value.strip()
    return info


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    rows = [[str(v) for v in row] for row in rows]
    align = ["---:" if rows and _numeric(rows[0][i]) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    text = text.rstrip("x%").replace(",", "")
    try:
        float(text)
    except ValueError:
        return False
    return True
