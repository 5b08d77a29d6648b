"""CRAM's neutral start (``--model.finetune.cram_init neutral``): channel importances that
begin nearly equal, so that ``x_e`` starts as the stage's map rescaled."""

from __future__ import annotations

import torch

from crasmra.layers.cram import CRAM
from crasmra.model import Network

__all__ = ["NEUTRAL_SCALE", "neutral_cram_start"]

#: The factor on the random initialisation of CRAM's last MLP layer. Small enough that the
#: importances I = sigmoid(MLP(avg) + MLP(max)) start within about 1e-3 of 0.5; not zero,
#: so that the softmax of I still has a single top channel: with all importances equal
#: every channel would tie at the maximum and the mask would suppress them all.
NEUTRAL_SCALE = 1e-3


@torch.no_grad()
def neutral_cram_start(net: Network, scale: float = NEUTRAL_SCALE) -> int:
    """Scale the last layer of every CRAM's importance MLP by ``scale``.

    With PyTorch's initialisation the MLP gives each channel a random importance in (0, 1):
    ``x_e = Conv_layer(I * X)`` then reweighs the pretrained channels at random before the
    heads read them. Scaled down, I starts near 0.5 on every channel, ``I * X`` is the map
    halved (which the head paths' BatchNorm absorbs), and training moves I from there. The
    suppression mask S keeps the paper's definition; it damps the top channel(s) of the
    nearly flat softmax.

    Args:
        net: The network; modules other than CRAM are left alone.
        scale: The factor on the last MLP layer's weights, in (0, 1].

    Returns:
        The number of CRAM modules changed.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    changed = 0
    for module in net.attention:
        if isinstance(module, CRAM):
            module.mlp[-1].weight.mul_(scale)
            changed += 1
    return changed
