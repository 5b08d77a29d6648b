"""Networks with each registered attention module, for the tests of cam, export and serve.

``SCALE`` is a module of the tests' own that has nothing but the registry's contract (no
``conv_layer`` attribute), so these tests also show what a new module gets with no other edit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from crasmra.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Preprocessing
from crasmra.layers import attention_names, register_attention
from crasmra.model import PAPER_VARIANTS_ATTENTION, CRASMRANet, create_model
from crasmra.outputs import ModelOutput

#: Image side of the test networks.
SIZE = 64
#: Classes of the test networks.
NUM_CLASSES = 4
#: The tests' own attention module.
SCALE = "test-scale"


@register_attention(SCALE)
class ScaleAttention(nn.Module):
    """``x_e = proj(s x)`` for the head, ``x_s = x`` for the next stage; a learnt scale ``s``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, in_channels, 1, 1))
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(self.scale * x), x


def registered_attention() -> list[str]:
    """Every registered attention module, the tests' own included."""
    return list(attention_names())


def variant_of(attention: str) -> str:
    """The variant that builds ``attention`` after each stage (a paper variant or its name)."""
    return next((v for v, a in PAPER_VARIANTS_ATTENTION.items() if a == attention), attention)


def attention_network(attention: str, seed: int = 0) -> CRASMRANet:
    """A small untrained network with ``attention`` after each stage, ready for inference."""
    torch.manual_seed(seed)
    net = create_model("resnet10t", NUM_CLASSES, variant=variant_of(attention), head_channels=8,
                       head_hidden=8)
    preprocessing = Preprocessing.from_config({
        "image_size": [SIZE, SIZE], "resize_size": None,
        "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)})
    net.set_inference_info([f"class_{i}" for i in range(NUM_CLASSES)], preprocessing)
    return net.eval()


def head_map_layer(module: nn.Module) -> nn.Module | None:
    """The layer inside ``module`` whose output is x_e (CRAM's ``conv_layer``, the tests' own
    module's ``proj``), or None."""
    if isinstance(module, ScaleAttention):
        return module.proj
    return getattr(module, "conv_layer", None)


def own_head(output: ModelOutput, stage: int) -> Tensor:
    """The logits of stage ``stage``'s own head, the ones its map explains."""
    return output.stage_logits[stage]


def library_gradcam(
    net: CRASMRANet, x: Tensor, class_index: int,
    head: Callable[[ModelOutput, int], Tensor] = own_head,
) -> list[np.ndarray] | None:
    """pytorch-grad-cam's GradCAM of each stage on the whole network, independently of crasmra's
    taps: the target layer is the module's layer that outputs x_e (:func:`head_map_layer`) and
    the model output ``head(output, stage)``; None when a module has no such layer.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = [head_map_layer(m) for m in net.attention]
    if not layers or any(layer is None for layer in layers):
        return None

    class Logits(nn.Module):
        def __init__(self, stage: int) -> None:
            super().__init__()
            self.net, self.stage = net, stage

        def forward(self, images: Tensor) -> Tensor:
            return head(self.net(images), self.stage)

    maps = []
    x = x.detach().clone().requires_grad_(True)
    for i, layer in enumerate(layers):
        with torch.enable_grad(), GradCAM(model=Logits(i), target_layers=[layer]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])
        maps.append(np.asarray(heat[0], dtype=np.float32))
    net.zero_grad(set_to_none=True)
    return maps
