"""The one overlay crasmra draws: a [0, 1] heat map in the jet colour map over the image, as
``crasmra cam`` saves it and ``crasmra serve`` sends it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["OVERLAY_ALPHA", "HeatOverlay", "denormalize"]

#: Opacity of a heat map drawn over the image.
OVERLAY_ALPHA = 0.5


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised image, (3, H, W) or (1, 3, H, W), as the (H, W, 3) float image in [0, 1]
    that the network saw."""
    x = image.detach().float().reshape(-1, *image.shape[-3:])[0].cpu()
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


class HeatOverlay:
    """Blends heat maps over an image: ``(1 - alpha) * image + alpha * jet(heat)``.

    The colour map is looked up once (256 colours), so drawing an overlay is one indexing and
    one blend in NumPy.

    Args:
        alpha: Opacity of the heat map.
    """

    def __init__(self, alpha: float = OVERLAY_ALPHA) -> None:
        from matplotlib import colormaps

        self.alpha = float(alpha)
        self.lut = colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)

    def colours(self, heat: np.ndarray) -> np.ndarray:
        """(H, W) map in [0, 1] -> (H, W, 3) jet colours in [0, 1]."""
        return self.lut[np.clip(np.rint(heat * 255), 0, 255).astype(np.intp)]

    def blend(self, image: np.ndarray, heat: np.ndarray) -> np.ndarray:
        """The (H, W, 3) float image in [0, 1] with ``heat`` (H, W) in [0, 1] drawn over it."""
        return (1.0 - self.alpha) * image + self.alpha * self.colours(heat)
