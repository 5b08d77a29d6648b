"""Grad-CAM of every attended stage, computed by pytorch-grad-cam's ``GradCAM``.

Stage ``i``'s map explains its own head's logit for a class with the stage's head-side map x_e
(the first output of the stage's attention module) as the target layer, as in the paper's
Figure 5. The plain variant has one map: timm's classifier logit on the last stage's output,
the map its head reads.

The backbone runs once, without a graph. :class:`StageHeads` is the model ``GradCAM`` sees: it
passes each stage's cached x_e through an ``nn.Identity`` tap of its own (the target layers)
into the heads, and returns the explaining head's logits, so each stage's ``GradCAM`` re-runs
only the heads.

An attention module needs nothing beyond its contract (``forward(x) -> (x_e, x_s)``, see
:mod:`crasmra.layers.registry`): no named layer is looked up. pytorch-grad-cam is the optional
``viz`` extra (``pip install "crasmra[viz]"``), imported when a Grad-CAM is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from crasmra.errors import MissingExtraError
from crasmra.model import Network

__all__ = ["StageGradCAMs", "StageHeads", "gradcam_maps", "stage_gradcams"]


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


def _gradcam_classes() -> tuple[Any, Any]:
    """pytorch-grad-cam's ``GradCAM`` and ``ClassifierOutputTarget``, or the install command."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as err:
        raise MissingExtraError("Grad-CAM", "viz", "the grad-cam package") from err
    return GradCAM, ClassifierOutputTarget


def _stage_label(model: Network, index: int) -> str:
    name = model.stage_names[index] if index < len(model.stage_names) else f"stage {index}"
    if model.attention:
        return f"{name} ({type(model.attention[index]).__name__})"
    return name


def _check_map(model: Network, index: int, feature: Any) -> None:
    if not isinstance(feature, Tensor) or feature.dim() != 4 or not feature.is_floating_point():
        shape = (f"{tuple(feature.shape)} {feature.dtype}" if isinstance(feature, Tensor)
                 else type(feature).__name__)
        if not model.attention and isinstance(feature, Tensor) and feature.dim() == 3:
            # A plain ViT: timm's features are (N, tokens, C) and its classifier reads the
            # class token, so the patch tokens of its last block carry no gradient to explain.
            raise ValueError(
                f"Grad-CAM of the plain variant needs timm's last feature map as (N, C, h, w); "
                f"{model.config['backbone']} gives {shape} tokens. Explain one of its CRA-SMRA "
                "variants instead (--model.net.variant cra-smra), whose stage maps are "
                "(N, C, h, w)."
            )
        raise ValueError(
            f"Grad-CAM needs each stage's head-side map x_e as a floating-point (N, C, h, w) "
            f"tensor; {_stage_label(model, index)} gave {shape}. An attention module's forward "
            "must return (x_e, x_s) with x_e the map its stage head reads (see "
            "crasmra.layers.registry)."
        )


def _no_gradient(model: Network, index: int) -> ValueError:
    return ValueError(
        f"Grad-CAM: the head of {_stage_label(model, index)} does not read the map x_e that the "
        "attention module returns first, so it has no gradient. An attention module's forward "
        "must return (x_e, x_s), x_e for the head (see crasmra.layers.registry)."
    )


class StageHeads(nn.Module):
    """The model ``GradCAM`` explains: an image -> the logits of the head explaining one stage.

    The backbone and attention modules run once per image, without a graph; each call re-runs
    only the heads, on the cached maps x_e, each through its own tap in :attr:`taps`.

    Args:
        model: The network.
        image: The (1, 3, H, W) image whose maps are cached.

    Attributes:
        taps: One ``nn.Identity`` per attended stage, on that stage's x_e: the target layers.
        stage: The stage whose head's logits :meth:`forward` returns (plain: timm's classifier).
        features: The cached maps x_e, detached.
    """

    def __init__(self, model: Network, image: Tensor) -> None:
        super().__init__()
        self.net = model
        self.image = image
        self.features = self._features(image)
        self.taps = nn.ModuleList(nn.Identity() for _ in self.features)
        self.stage = 0
        # Whether the last call got as far as the logits, and the stages whose tap a gradient
        # reached: together they tell a head that ignores x_e from any other failure.
        self.ran = False
        self.reached: set[int] = set()

    def _features(self, image: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            features = tuple(self.net.forward_features(image))
        for i, feature in enumerate(features):
            _check_map(self.net, i, feature)
        return tuple(f.detach() for f in features)

    def forward(self, images: Tensor) -> Tensor:
        """(1, 3, H, W) -> (1, K) logits of the head that explains :attr:`stage`."""
        self.ran = False
        if images is not self.image:  # GradCAM passes the cached image back; another is run
            self.image, self.features = images, self._features(images)
        tapped = []
        for i, (tap, feature) in enumerate(zip(self.taps, self.features, strict=True)):
            # A leaf that needs a gradient: the tap's gradient exists even when the caller
            # froze the network's parameters.
            x_e = tap(feature.detach().requires_grad_(True))
            x_e.register_hook(lambda grad, i=i: self.reached.add(i))
            tapped.append(x_e)
        output = self.net.forward_heads(tapped)
        # Each stage's map is explained by its own stage head; plain's one by timm's classifier.
        logits = (output.stage_logits or output.logits)[self.stage]
        self.ran = True
        return logits


def stage_gradcams(
    model: Network, image: Tensor, class_index: int | None = None
) -> StageGradCAMs:
    """Predict one image and compute every attended stage's Grad-CAM.

    Args:
        model: The network (run in eval mode; not thread-safe: callers serialise access).
        image: One normalised image, (3, H, W) or (1, 3, H, W), on the model's device.
        class_index: The class to explain; None explains the predicted one.

    Returns:
        The prediction, the maps and the head-side maps they explain.

    Raises:
        crasmra.errors.MissingExtraError: pytorch-grad-cam is not installed.
        ValueError: An attention module does not give its stage head a (N, C, h, w) map
            that the head's logit depends on.
    """
    grad_cam, target = _gradcam_classes()
    x = image.detach().reshape(1, *image.shape[-3:])
    was_training = model.training
    model.eval()
    try:
        heads = StageHeads(model, x)
        with torch.no_grad():
            probs = model.forward_heads(heads.features).probs[0]
        index = int(probs.argmax()) if class_index is None else int(class_index)
        maps = [_explain_stage(grad_cam, target(index), heads, i) for i in range(len(heads.taps))]
    finally:
        # GradCAM's backward fills the heads' .grad: the shared model keeps none.
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return StageGradCAMs(probs=probs, class_index=index, maps=maps, features=list(heads.features))


def _explain_stage(grad_cam: Any, target: Any, heads: StageHeads, stage: int) -> np.ndarray:
    """One ``GradCAM`` of ``heads`` with stage ``stage``'s tap as the target layer."""
    heads.stage = stage
    heads.reached.discard(stage)
    swallowed: IndexError | None = None
    # enable_grad: a caller under no_grad (a deployment script) still gets its maps.
    with torch.enable_grad(), grad_cam(model=heads, target_layers=[heads.taps[stage]]) as cam:
        try:
            heat = cam(input_tensor=heads.image, targets=[target])
        except (AttributeError, RuntimeError) as err:
            # No gradient reached the tap: GradCAM fails on the missing gradient (or, with
            # frozen parameters, on a logit without a graph). Other failures pass unchanged.
            if heads.ran and stage not in heads.reached:
                raise _no_gradient(heads.net, stage) from err
            raise
        except IndexError as err:
            swallowed = err  # GradCAM's __exit__ would print an IndexError and drop it
    if swallowed is not None:
        raise swallowed
    return np.asarray(heat[0], dtype=np.float32)


def gradcam_maps(model: Network, image: Tensor, class_index: int) -> list[np.ndarray]:
    """Grad-CAM of ``class_index`` for every attended stage, each (H, W) in [0, 1].

    See :func:`stage_gradcams`, which also returns the prediction.

    Args:
        model: The network.
        image: One normalised image, (3, H, W) or (1, 3, H, W).
        class_index: The class to explain (normally the predicted one).

    Raises:
        crasmra.errors.MissingExtraError: pytorch-grad-cam is not installed.
    """
    return stage_gradcams(model, image, class_index).maps
