"""Weight-space ensembling of the starting and the fine-tuned weights
(``--model.finetune.wise_alpha``).

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): after
fine-tuning, every weight becomes ``(1 - alpha) * start + alpha * trained``. The start here is
the network as it is before the first step: the pretrained backbone with its heads imprinted
or probed, a classifier at about the nearest class mean of the pretrained features. Few
photos per class make the steps noisy; the mix keeps part of the start and still moves
towards what training found.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mix_weights", "snapshot_state"]


def snapshot_state(net: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``net``'s state dict (parameters and buffers), on the CPU."""
    return {key: value.detach().to("cpu", copy=True) for key, value in net.state_dict().items()}


def mix_weights(net: nn.Module, start: dict[str, Tensor], alpha: float) -> None:
    """Set every floating-point tensor of ``net``'s state to ``(1 - alpha) * start + alpha *
    current``, in place.

    Integer buffers (BatchNorm's ``num_batches_tracked``) keep their current value.

    Args:
        net: The trained network; its state is replaced by the mix.
        start: Its state before training (:func:`snapshot_state`), the same keys and shapes.
        alpha: The trained weights' share, in [0, 1]: 1 leaves ``net`` as trained, 0 restores
            the start.

    Raises:
        ValueError: ``alpha`` is outside [0, 1] or ``start`` does not match ``net``'s state.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    state = net.state_dict()
    if set(state) != set(start):
        missing, extra = sorted(set(state) - set(start)), sorted(set(start) - set(state))
        raise ValueError(f"the starting weights do not match the network: {len(missing)} keys "
                         f"missing (first: {missing[:3]}), {len(extra)} unexpected (first: "
                         f"{extra[:3]}).")
    with torch.no_grad():
        for key, current in state.items():
            if not current.is_floating_point():
                continue
            first = start[key]
            if first.shape != current.shape:
                raise ValueError(f"the starting weights do not match the network: {key} is "
                                 f"{tuple(first.shape)} there and {tuple(current.shape)} here.")
            # lerp(start, trained, alpha) = start + alpha * (trained - start).
            current.copy_(torch.lerp(first.to(current), current, alpha))
