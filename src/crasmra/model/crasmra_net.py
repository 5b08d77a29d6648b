"""The paper's network: staged backbone + an attention module after each attended stage +
one head per stage and a head on their concatenation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from crasmra.backbones import StagedBackbone
from crasmra.layers import ClassifierHead, create_attention
from crasmra.model.base import Network
from crasmra.model.config import NetConfig, attention_of
from crasmra.outputs import ModelOutput

__all__ = ["CRASMRANet"]


class CRASMRANet(Network):
    """Backbone + per-stage attention + one head per stage + a concat head.

    The network of the paper's variants (``baseline``, ``cbam``, ``cram``, ``cra-smra``) and
    of every registered attention module; ``plain`` is :class:`~crasmra.model.PlainNet`.

    Args:
        backbone: timm model name with at least three feature stages (CNN, Swin, ViT).
        num_classes: Number of classes K.
        variant: One of :func:`~crasmra.model.variant_names` but ``"plain"``; which attention
            module follows each attended stage (see
            :data:`~crasmra.model.PAPER_VARIANTS_ATTENTION`).
        pretrained: False (random init), True (timm ImageNet weights by name) or a path to a
            local timm-format backbone state dict.
        **hparams: The other fields of :class:`~crasmra.model.NetConfig`, documented there
            with their defaults.

    Attributes:
        heads: One :class:`~crasmra.layers.ClassifierHead` per attended stage.
        concat_head: Head on the concatenated pooled stage features (n * C_a).

    The other attributes are :class:`~crasmra.model.Network`'s.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        variant: str = NetConfig.variant,
        pretrained: bool | str | os.PathLike = NetConfig.pretrained,
        **hparams: Any,
    ) -> None:
        cfg = NetConfig.from_kwargs(
            backbone=backbone, num_classes=num_classes, variant=variant, **hparams
        )
        attention = attention_of(variant)
        if attention is None:
            raise ValueError(f"The {variant!r} variant has no attention module: build it with "
                             "crasmra.model.build_network(**config).")
        staged = StagedBackbone(
            backbone,
            pretrained=pretrained,
            stage_indices=cfg.stage_indices,
            final_features=bool(cfg.final_features),
            img_size=cfg.img_size,
        )
        super().__init__(cfg, staged, staged.stage_names)
        self.attention = nn.ModuleList(
            create_attention(
                attention, c, cfg.head_channels, cfg.attention_settings(),
                cfg.attention_options,
            )
            for c in staged.stage_channels
        )
        self._head_kwargs = {"hidden": cfg.head_hidden, "pool": cfg.head_pool}
        self.heads, self.concat_head = self._build_heads(num_classes)
        self._finish(cfg)

    @property
    def head_names(self) -> tuple[str, ...]:
        """``(*stage_names, "concat")``, the order of ``ModelOutput.logits``."""
        return (*self.stage_names, "concat")

    def _build_heads(self, num_classes: int) -> tuple[nn.ModuleList, ClassifierHead]:
        n, c_a = len(self.stage_names), self.head_channels
        heads = nn.ModuleList(
            ClassifierHead(c_a, num_classes, **self._head_kwargs) for _ in range(n)
        )
        return heads, ClassifierHead(n * c_a, num_classes, **self._head_kwargs)

    def _new_heads(self, num_classes: int) -> None:
        ref = next(self.concat_head.parameters())
        heads, concat_head = self._build_heads(num_classes)
        self.heads = heads.to(device=ref.device, dtype=ref.dtype)
        self.concat_head = concat_head.to(device=ref.device, dtype=ref.dtype)

    def classifier_layers(self) -> dict[str, nn.Module]:
        """The last linear layer of every head, by head name."""
        layers = [head.mlp[-1] for head in self.heads] + [self.concat_head.mlp[-1]]
        return dict(zip(self.head_names, layers, strict=True))

    def added_modules(self) -> list[nn.Module]:
        """The attention modules, the stage heads and the concat head."""
        return [*self.attention, *self.heads, self.concat_head]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group (SPEC recipe).

        Returns:
            ``{"backbone": ..., "attention": ... (CRAM/CBAM incl. Conv_layer), "heads": ...
            (stage heads + concat head)}``; every trainable parameter is in exactly one group.
        """

        def trainable(*modules: nn.Module) -> list[nn.Parameter]:
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        return {
            "backbone": trainable(self.backbone),
            "attention": trainable(self.attention),
            "heads": trainable(self.heads, self.concat_head),
        }

    def forward_features(self, x: Tensor) -> tuple[Tensor, ...]:
        """Run backbone and attention; return the head-side maps x_e, one per stage."""
        features = []
        state: Any = x
        for i, attention in enumerate(self.attention):
            state = self.backbone.forward_segment(i, state)
            # The attention reads the stage's (B, C, H, W) map X; x_s, in the backbone's own
            # layout (Swin: channels-last; ViT: behind its class tokens), feeds the next stage.
            x_e, x_s = attention(self.backbone.stage_map(state))
            state = self.backbone.with_map(state, x_s)
            features.append(x_e)
        return tuple(features)

    def forward_heads(self, features: Sequence[Tensor]) -> ModelOutput:
        """Classify the maps :meth:`forward_features` returned (e.g. detached, for Grad-CAM)."""
        features = tuple(features)
        pooled = [head.pool_features(f) for head, f in zip(self.heads, features, strict=True)]
        stage_logits = tuple(head.classify(p) for head, p in zip(self.heads, pooled, strict=True))
        concat_logits = self.concat_head.classify(torch.cat(pooled, dim=1))  # (B, n*C_a)
        return ModelOutput(
            stage_logits=stage_logits,
            concat_logits=concat_logits,
            features=features,
            stage_names=self.stage_names,
            head_weights=self.head_weights,
        )
