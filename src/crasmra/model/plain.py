"""The reference every fine-grained paper compares against: timm's own classifier fine-tuned."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from crasmra.backbones import StagedBackbone
from crasmra.model.base import Network
from crasmra.model.config import PLAIN, NetConfig
from crasmra.outputs import PLAIN_HEAD, ModelOutput

__all__ = ["PlainNet"]


class PlainNet(Network):
    """The timm model with its own head, fine-tuned as timm fine-tunes it.

    ``forward_features`` then ``forward_head``: global pooling and the classifier on the last
    stage, reset to K classes. No attention, no stage heads; its one head is named
    ``"classifier"`` (:data:`~crasmra.outputs.PLAIN_HEAD`). The attention and head
    hyperparameters of :class:`~crasmra.model.NetConfig` are validated, recorded in
    ``config`` and otherwise ignored, so one sweep can list ``plain`` beside the paper's
    variants.

    Args:
        backbone: timm model name (CNN, Swin, ViT).
        num_classes: Number of classes K.
        pretrained: False, True (timm ImageNet weights by name) or a local weights file.
        **hparams: The other fields of :class:`~crasmra.model.NetConfig`.

    The attributes are :class:`~crasmra.model.Network`'s; ``backbone`` holds the whole timm
    model, head included.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: bool | str | os.PathLike = NetConfig.pretrained,
        **hparams: Any,
    ) -> None:
        cfg = NetConfig.from_kwargs(
            backbone=backbone, num_classes=num_classes, variant=PLAIN, **hparams
        )
        staged = StagedBackbone(
            backbone,
            pretrained=pretrained,
            stage_indices=cfg.stage_indices,
            num_classes=num_classes,  # timm's own head, its classifier reset to K classes
            final_features=bool(cfg.final_features),
            img_size=cfg.img_size,
        )
        super().__init__(cfg, staged, (f"stage{staged.num_feature_stages}",))
        self._finish(cfg)

    @property
    def head_names(self) -> tuple[str, ...]:
        """``("classifier",)``."""
        return (PLAIN_HEAD,)

    def _new_heads(self, num_classes: int) -> None:
        self.backbone.reset_classifier(num_classes)

    def classifier_layers(self) -> dict[str, nn.Module]:
        """timm's classifier."""
        return {PLAIN_HEAD: self.backbone.model.get_classifier()}

    def added_modules(self) -> list[nn.Module]:
        """None: timm's own classifier is part of the backbone."""
        return []

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``"heads"``: timm's classifier; ``"backbone"``: everything else; no attention."""
        classifier = {id(p) for p in self.backbone.classifier_parameters()}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return {
            "backbone": [p for p in backbone if id(p) not in classifier],
            "attention": [],
            "heads": [p for p in backbone if id(p) in classifier],
        }

    def forward_features(self, x: Tensor) -> tuple[Tensor, ...]:
        """The one map timm's ``forward_features`` returns."""
        return (self.backbone.forward_features(x),)

    def forward_heads(self, features: Sequence[Tensor]) -> ModelOutput:
        """timm's ``forward_head`` on the map."""
        features = tuple(features)
        return ModelOutput(
            stage_logits=(),
            concat_logits=None,
            features=features,
            stage_names=self.stage_names,
            classifier_logits=self.backbone.forward_head(features[0]),
            head_weights=self.head_weights,
        )
