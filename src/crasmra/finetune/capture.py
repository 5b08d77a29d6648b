"""One pass of a network over labelled batches, reading the inputs of chosen layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

__all__ = ["run_capturing_inputs"]


def run_capturing_inputs(
    net: nn.Module,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    modules: Sequence[nn.Module],
    record: Callable[[int, Tensor, Tensor], object],
) -> None:
    """Run ``net`` over ``batches``; per batch call ``record(i, input of modules[i], labels)``.

    The inputs are detached float tensors on the network's device, the labels on the CPU.
    The network runs in whatever mode the caller set.
    """
    captured: dict[int, Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0].detach().float())
        )
        for i, module in enumerate(modules)
    ]
    try:
        for images, target in batches():
            captured.clear()
            net(images)
            target = target.cpu()
            for i in range(len(modules)):
                record(i, captured[i], target)
    finally:
        for hook in hooks:
            hook.remove()
