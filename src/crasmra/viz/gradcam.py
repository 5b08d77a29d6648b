"""Grad-CAM of every attended stage, in one forward and one backward pass.

Stage ``i``'s map explains its own head's logit for a class: the gradient of that logit with
respect to the stage's head-side map x_e (the first output of the stage's attention module),
averaged over space, weights x_e's channels; then ReLU, bilinear upsampling to the input and
min-max scaling to [0, 1]. That is the rule of Grad-CAM (Selvaraju et al.) and of
pytorch-grad-cam's ``GradCAM`` with the module that outputs x_e as the target layer; the tests
check the maps against that library.

The backbone runs once without a graph; only the heads run with autograd, from x_e detached.
x_e of stage ``i`` feeds only head ``i`` and the concat head, so one backward pass of the sum
of the stage logits yields each stage's own gradient, where a per-layer Grad-CAM would run a
forward and a full backward pass per stage. The plain variant has one map: the last stage's
output, which timm's classifier reads, explained by that classifier's logit.

An attention module needs nothing beyond its contract (``forward(x) -> (x_e, x_s)``, see
:mod:`crasmra.layers.registry`): no named layer is looked up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from crasmra.model import CRASMRANet
from crasmra.viz.maps import unit_maps

__all__ = ["StageGradCAMs", "gradcam_maps", "stage_gradcams"]


@dataclass
class StageGradCAMs:
    """The prediction of one image and the Grad-CAM of each attended stage.

    Attributes:
        probs: (K,) combined class probabilities (mean of every head's softmax).
        class_index: The explained class.
        maps: One (H, W) map in [0, 1] per attended stage, at the input's size.
        features: The head-side maps x_e, each (1, C_a, h, w), detached.
    """

    probs: Tensor
    class_index: int
    maps: list[np.ndarray]
    features: list[Tensor]


def _stage_label(model: CRASMRANet, index: int) -> str:
    name = model.stage_names[index] if index < len(model.stage_names) else f"stage {index}"
    if model.attention:
        return f"{name} ({type(model.attention[index]).__name__})"
    return name


def _check_map(model: CRASMRANet, index: int, feature: Tensor) -> None:
    if not isinstance(feature, Tensor) or feature.dim() != 4:
        shape = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
        raise ValueError(
            f"Grad-CAM needs each stage's head-side map x_e as a (N, C, h, w) tensor; "
            f"{_stage_label(model, index)} gave {shape}. An attention module's forward must "
            "return (x_e, x_s) with x_e the map its stage head reads (see "
            "crasmra.layers.registry)."
        )


def stage_gradcams(
    model: CRASMRANet, image: Tensor, class_index: int | None = None
) -> StageGradCAMs:
    """Predict one image and compute every attended stage's Grad-CAM in one pass.

    Args:
        model: The network (run in eval mode; not thread-safe: callers serialise access).
        image: One normalised image, (3, H, W) or (1, 3, H, W), on the model's device.
        class_index: The class to explain; None explains the predicted one.

    Returns:
        The prediction, the maps and the head-side maps they explain.

    Raises:
        ValueError: An attention module does not give its stage head a (N, C, h, w) map
            that the head's logit depends on.
    """
    x = image.detach().reshape(1, *image.shape[-3:])
    size = (x.shape[-2], x.shape[-1])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = list(model.forward_features(x))
        for i, feature in enumerate(features):
            _check_map(model, i, feature)
        with torch.enable_grad():
            leaves = [f.detach().requires_grad_(True) for f in features]
            output = model.forward_heads(leaves)
            probs = output.probs[0].detach()
            index = int(probs.argmax()) if class_index is None else int(class_index)
            # Each map is explained by its own stage head; plain's one map by timm's classifier.
            explaining = output.stage_logits or output.logits
            target = torch.stack([logits[0, index] for logits in explaining]).sum()
            # autograd.grad, not backward(): nothing accumulates in the model's .grad.
            grads = torch.autograd.grad(target, leaves, allow_unused=True)
    finally:
        model.train(was_training)
    for i, grad in enumerate(grads):
        if grad is None:
            raise ValueError(
                f"Grad-CAM: the head of {_stage_label(model, i)} does not read the map x_e that "
                "the attention module returns first, so it has no gradient. An attention "
                "module's forward must return (x_e, x_s), x_e for the head (see "
                "crasmra.layers.registry)."
            )
    maps = [
        unit_maps(torch.relu((g[0].mean(dim=(1, 2))[:, None, None] * f[0].detach())
                             .sum(dim=0))[None], size)[0]
        for f, g in zip(leaves, grads, strict=True)
    ]
    return StageGradCAMs(probs=probs, class_index=index, maps=maps,
                         features=[f.detach() for f in leaves])


def gradcam_maps(model: CRASMRANet, image: Tensor, class_index: int) -> list[np.ndarray]:
    """Grad-CAM of ``class_index`` for every attended stage, each (H, W) in [0, 1].

    See :func:`stage_gradcams`, which also returns the prediction.

    Args:
        model: The network.
        image: One normalised image, (3, H, W) or (1, 3, H, W).
        class_index: The class to explain (normally the predicted one).
    """
    return stage_gradcams(model, image, class_index).maps
