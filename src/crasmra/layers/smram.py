"""Spatial multi-region attention (SMRAM) and its diversity loss (training only).

SMRAM reads the enhanced head-side maps ``x_e`` of the attended stages (SPEC open point: the
figure caption and section 3.2 say X_e, section 3.3 says X_s; we use X_e) and returns a loss
that pushes the stages to attend to different regions. It has parameters but makes no
prediction, so it lives with the loss in the training engine and never in the inference
network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DIVERSITY_FORMS", "SMRAM", "diversity_loss"]

DiversityForm = Literal["1-h", "-h"]
DIVERSITY_FORMS: tuple[str, ...] = ("1-h", "-h")


def diversity_loss(attention: Tensor, form: DiversityForm = "1-h") -> Tensor:
    """Diversity loss L_div of SPEC (SMRAM steps 5-7).

    ``h = (1/S) * sum_j max_s attention[s, j]`` (cross-channel max pooling, then a sum over
    positions), averaged over the batch. Identical maps give ``h = 1/S``; maps with disjoint
    support give ``h = 1``.

    Args:
        attention: (B, S, H, W) spatial distributions, each (b, s) map summing to 1.
        form: ``"1-h"`` (default, SPEC; lies in [0, 1 - 1/S]) or ``"-h"``. They differ by a
            constant, so gradients are identical; ``"1-h"`` is non-negative and reads as a loss.

    Returns:
        Scalar loss.
    """
    if attention.ndim != 4:
        raise ValueError(f"attention must be (B, S, H, W), got shape {tuple(attention.shape)}")
    num_stages = attention.shape[1]
    peak = attention.flatten(2).amax(dim=1)  # (B, H*W): CCMP over the S maps
    h = peak.sum(dim=1) / num_stages  # (B,)
    if form == "1-h":
        return 1.0 - h.mean()
    if form == "-h":
        return -h.mean()
    raise ValueError(f"form must be one of {DIVERSITY_FORMS}, got {form!r}")


class SMRAM(nn.Module):
    """Spatial multi-region attention module (SPEC, "SMRAM").

    Per stage: Conv_block (adaptive average pooling to the smallest map's size, then
    BatchNorm2d), phi (1x1 conv, C_a -> 1), softmax over the H_L*W_L positions. The stacked
    distributions feed :func:`diversity_loss`.

    The BatchNorm is non-affine and phi has no bias (ours: the paper does not say): a softmax
    over space ignores any constant shift, so BN's beta and phi's bias would never receive a
    gradient, and BN's gamma is absorbed by phi's weights. The function class is the same as
    with affine BN.

    Args:
        channels: C_a, the channel count of every input map.
        num_stages: Number of input maps (3 in the paper).
        loss_form: ``"1-h"`` (default) or ``"-h"``; see :func:`diversity_loss`.
    """

    def __init__(
        self, channels: int, num_stages: int = 3, loss_form: DiversityForm = "1-h"
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if loss_form not in DIVERSITY_FORMS:
            raise ValueError(f"loss_form must be one of {DIVERSITY_FORMS}, got {loss_form!r}")
        self.channels = channels
        self.num_stages = num_stages
        self.loss_form = loss_form
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(channels, affine=False) for _ in range(num_stages)
        )
        self.phi = nn.ModuleList(
            nn.Conv2d(channels, 1, kernel_size=1, bias=False) for _ in range(num_stages)
        )

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Compute the diversity loss of the stage maps.

        Args:
            features: ``num_stages`` maps (B, C_a, H_l, W_l); sizes may differ and need not be
                square.

        Returns:
            ``(loss, attention)``: scalar loss and (B, num_stages, H_L, W_L) distributions,
            where (H_L, W_L) is the smallest height and width among the inputs.
        """
        if len(features) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} feature maps, got {len(features)}")
        size = (min(f.shape[-2] for f in features), min(f.shape[-1] for f in features))
        logits = [
            phi(norm(F.adaptive_avg_pool2d(f, size)))  # (B, 1, H_L, W_L)
            for f, norm, phi in zip(features, self.norms, self.phi, strict=True)
        ]
        stacked = torch.cat(logits, dim=1)  # (B, S, H_L, W_L)
        b, s, h, w = stacked.shape
        # Softmax in float32: mixed precision would otherwise round the tiny per-position
        # probabilities of large maps.
        attention = stacked.float().flatten(2).softmax(dim=-1).view(b, s, h, w)
        return diversity_loss(attention, self.loss_form), attention
