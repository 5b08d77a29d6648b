"""Maps of one image, each upsampled to the input and scaled to [0, 1]: activations, SMRAM's
spatial attention, CRAM's channel importance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crasmra.layers import SMRAM

__all__ = ["activation_maps", "channel_importance", "smram_maps", "unit_maps"]


def _to_unit(maps: Tensor) -> Tensor:
    """Min-max scale each (H, W) map of an (N, H, W) tensor to [0, 1] (constant maps -> 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W), bilinear."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def unit_maps(maps: Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    """(N, h, w) maps -> N arrays (H, W), bilinearly upsampled and min-max scaled to [0, 1].

    The one scaling of every map crasmra draws (``crasmra cam``, the web page).
    """
    return list(_to_unit(_upsample(maps, size)).cpu().numpy())


def activation_maps(features: Sequence[Tensor], size: tuple[int, int]) -> list[np.ndarray]:
    """Channel-mean activation map of each stage (the paper's Figure 4), scaled to [0, 1].

    Args:
        features: The head-side maps x_e of one image, each (1, C_a, h, w) or (C_a, h, w).
        size: Output (H, W), normally the input image's.

    Returns:
        One (H, W) array per stage.
    """
    maps = []
    for f in features:
        mean = f.detach().float().reshape(-1, *f.shape[-3:])[0].mean(dim=0)  # (h, w)
        maps.append(unit_maps(mean[None], size)[0])
    return maps


def smram_maps(smram: SMRAM, features: Sequence[Tensor], size: tuple[int, int]) -> list[np.ndarray]:
    """SMRAM's spatial attention of each stage for one image, upsampled and scaled to [0, 1].

    Args:
        smram: SMRAM with trained weights, in eval mode (see ``crasmra.inference.load_smram``).
        features: The head-side maps x_e of one image, each (1, C_a, h, w).
        size: Output (H, W).
    """
    with torch.inference_mode():
        _, attention = smram([f.detach()[:1] for f in features])  # (1, S, h, w)
    return unit_maps(attention[0], size)


def channel_importance(records: Sequence[Tensor | None]) -> list[np.ndarray] | None:
    """The first image's channel importance I, one (C,) array per stage.

    Args:
        records: What :func:`~crasmra.layers.record_channel_importance` recorded.

    Returns:
        None when nothing was recorded (plain / baseline / cbam networks have no CRAM).
    """
    if not records or any(r is None for r in records):
        return None
    return [r[0].float().cpu().numpy() for r in records]  # type: ignore[index]
