"""Where and how the inference network runs: the device, and the CPU's memory format and
precision."""

from __future__ import annotations

import torch
from torch import Tensor

from crasmra.cpu import ComputePlan, cpu_autocast, plan_compute
from crasmra.model import Network
from crasmra.outputs import ModelOutput

__all__ = ["cpu_compute_plan", "resolve_device", "run_network"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: the first CUDA GPU when there is one, else the CPU.

    Raises:
        ValueError: The device is unknown or not available on this machine (checked here, so
            that a command fails before it loads anything rather than deep inside ``.to()``).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"Unknown device {device!r} ({err}); use cpu, cuda, cuda:1, mps or auto."
        ) from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"Device {device!r}: there is no CUDA device here (or PyTorch was "
                             "installed without CUDA support); use --device cpu, or auto.")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"Device {device!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}; choose one of those, or auto.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Device {device!r}: Apple's MPS is not available here; use --device "
                         "cpu, or auto.")
    return resolved


def cpu_compute_plan(model: Network) -> ComputePlan | None:
    """The memory format and precision chosen for ``model``'s backbone on this CPU (the same
    choice as training's, :func:`crasmra.cpu.plan_compute`); None when it runs elsewhere."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return None
    return plan_compute(str(model.config.get("backbone", "")))


def run_network(model: Network, images: Tensor) -> ModelOutput:
    """``model(images)`` on the model's device, in the memory format and precision of
    :func:`cpu_compute_plan` on a CPU. Call it under ``torch.inference_mode()``."""
    images = images.to(next(model.parameters()).device)
    plan = cpu_compute_plan(model)
    if plan is not None and plan.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with cpu_autocast(plan is not None and plan.bf16):
        return model(images)
