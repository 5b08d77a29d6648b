"""The optimiser and its schedule: SGD with per-module learning rates, linear warm-up, then
cosine decay per optimiser step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from crasmra.engine.parts import OptimConfig
from crasmra.model import Network

__all__ = ["WarmupCosine", "build_scheduler", "build_sgd", "parameter_groups"]


def parameter_groups(net: Network, smram: nn.Module | None,
                     optim: OptimConfig) -> list[dict[str, Any]]:
    """SGD parameter groups with the paper's per-module learning rates (empty ones left out)."""
    groups = net.parameter_groups()
    spec = [
        ("backbone", groups["backbone"], optim.lr_backbone),
        ("attention", groups["attention"], optim.lr_attention),
        ("heads", groups["heads"], optim.lr_heads),
        ("smram", list(smram.parameters()) if smram is not None else [], optim.smram_lr()),
    ]
    return [{"name": n, "params": p, "lr": lr} for n, p, lr in spec if p]


def build_sgd(groups: list[dict[str, Any]], optim: OptimConfig,
              device: torch.device) -> torch.optim.SGD:
    """SGD over ``groups`` with the part's momentum, weight decay and Nesterov switch."""
    # The fused kernel exists for CUDA; elsewhere the multi-tensor (foreach) path is fastest.
    fused = device.type == "cuda"
    return torch.optim.SGD(
        groups, lr=optim.lr_backbone, momentum=optim.momentum,
        weight_decay=optim.weight_decay, nesterov=optim.nesterov and optim.momentum > 0,
        fused=fused or None, foreach=None if fused else True)


class WarmupCosine:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_lr_ratio``.

    A plain callable object rather than a lambda, so ``LambdaLR`` saves its settings in the
    checkpoint as plain numbers (readable with ``torch.load(weights_only=True)``).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay with optional linear warm-up; every group keeps its own base rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio)
    )
