"""Classifier heads: global pooling followed by PMG's small MLP."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

__all__ = ["HEAD_POOLS", "ClassifierHead"]

HeadPool = Literal["max", "avg"]
HEAD_POOLS: tuple[str, ...] = ("max", "avg")


class ClassifierHead(nn.Module):
    """Global pool -> BN1d -> Linear(in, hidden) -> BN1d -> ELU -> Linear(hidden, K).

    The MLP is PMG's classifier, which CRA-SMRA builds on. The same class serves the concat
    head: call :meth:`classify` on the concatenation of the stage heads' pooled features.

    Args:
        in_channels: Channels of the input map (or length of the pooled vector).
        num_classes: K.
        hidden: Width of the hidden layer (PMG: 512).
        pool: ``"max"`` (default, as PMG) or ``"avg"`` global pooling (SPEC open point).
    """

    def __init__(
        self, in_channels: int, num_classes: int, hidden: int = 512, pool: HeadPool = "max"
    ) -> None:
        super().__init__()
        if pool == "max":
            self.pool: nn.Module = nn.AdaptiveMaxPool2d(1)
        elif pool == "avg":
            self.pool = nn.AdaptiveAvgPool2d(1)
        else:
            raise ValueError(f"pool must be one of {HEAD_POOLS}, got {pool!r}")
        self.pool_type = pool
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = hidden
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(in_channels),
            nn.Linear(in_channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ELU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def pool_features(self, x: Tensor) -> Tensor:
        """Global-pool a (B, C, H, W) map to (B, C)."""
        return self.pool(x).flatten(1)

    def classify(self, pooled: Tensor) -> Tensor:
        """Map pooled features (B, in_channels) to logits (B, K)."""
        return self.mlp(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits for a (B, C, H, W) map or an already pooled (B, C) vector."""
        if x.ndim == 4:
            x = self.pool_features(x)
        return self.classify(x)

    def extra_repr(self) -> str:
        return f"pool={self.pool_type!r}"
