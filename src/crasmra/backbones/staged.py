"""A timm backbone split into ordered stages, so a module can act between two stages.

CRAM must transform a stage's output *before* the next stage reads it, which timm's
``features_only`` wrappers and ``forward_intermediates`` cannot do (they only tap outputs).
:class:`StagedBackbone` keeps the timm model itself (so its state dict keys stay timm's,
prefixed by ``model.``) and runs it one stage at a time, the way timm's own forward does.

Supported (see :mod:`crasmra.backbones.families`):

* CNNs whose feature forward is "call the children in order", with feature taps on children or
  inside top-level ``nn.Sequential`` containers: ResNet/ResNeXt, DenseNet, ConvNeXt,
  EfficientNet/MobileNet, RegNet and the like.
* Hierarchical Transformers built the same way: Swin, Swin-V2 (its maps are channels-last
  between stages and are handed to the attention modules as ``(B, C, H, W)``).
* Plain ViTs (ViT, DeiT, EVA): the blocks in groups, the patch tokens as a map between groups.

Between two segments a backbone's state is in its own layout (a map, a Swin ``(B, H, W, C)``
map, or a ViT's tokens); :meth:`StagedBackbone.stage_map` gives its ``(B, C, H, W)`` map and
:meth:`StagedBackbone.with_map` puts a (re-weighted) map back for the next segment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import timm
from torch import Tensor, nn

from crasmra.backbones.families import CNN
from crasmra.backbones.plan import ImageSize, build_timm_model, plan_stages
from crasmra.backbones.segments import ChildSegments
from crasmra.backbones.weights import (
    PretrainedArg,
    PretrainedWeightsError,
    check_backbone_name,
    load_weights_file,
)

__all__ = ["StagedBackbone"]

logger = logging.getLogger(__name__)


class StagedBackbone(nn.Module):
    """A timm model run stage by stage.

    Segment ``i`` runs the backbone from the previous selected stage (or the input) up to and
    including selected stage ``i``; modules after the last selected stage (global pool,
    classifier, unused final stages) are dropped, so every parameter is used. With
    ``num_classes`` the whole timm model is kept instead, its classifier reset to that many
    classes, and it runs as timm runs it (:meth:`forward_head` after :meth:`forward_features`).

    Args:
        name: timm model name, optionally with a pretrained tag (``"resnet50.tv_in1k"``).
        pretrained: False for random init; True for timm's weights of ``name``'s tag (a bare
            name takes timm's default tag, e.g. ``resnet50.a1_in1k``); a path to
            a local timm-format state dict of this model (``.safetensors``, or ``.pth``/``.bin``
            read with ``weights_only=True``). Classifier keys in the file are ignored.
        stage_indices: 0-based feature_info indices to expose; default the last three (a plain
            ViT, whose feature_info has one entry per block: its blocks in four equal groups,
            the last three, e.g. 5, 8, 11 for 12 blocks).
        num_classes: None (default) to drop timm's head; an int to keep timm's own head
            (``forward_head``) with its classifier reset to that many classes.
        final_features: The last selected stage (which must be the model's last feature
            stage) runs on to where timm's ``forward_features`` ends, so that it gives the
            features timm's classifier reads: EfficientNet's 1280 channels after ``conv_head``
            and ``bn2`` instead of its last block's 320, Swin's and ViT's final norm (see
            :func:`~crasmra.backbones.segments.feature_tail`). No change for models whose last
            stage is already that (ResNet).
        img_size: The input size a Transformer that timm builds for one size is built for
            (timm's ``img_size``; None: timm's default); it still runs at other sizes. CNNs
            ignore it.

    Attributes:
        model: The (trimmed) timm model; its state dict keys are timm's.
        family: ``"cnn"``, ``"hierarchical"`` (Swin) or ``"tokens"`` (plain ViT).
        stage_indices: Resolved feature_info indices.
        stage_names: ``"stage{i+1}"`` per selected index.
        stage_channels: Channels of each selected stage output, from feature_info.
        stage_reductions: Stride of each selected stage output, from feature_info.
        num_feature_stages: Length of the model's feature_info.
        data_config: timm's preprocessing config of the model (mean, std, input_size, ...).
    """

    def __init__(
        self,
        name: str,
        pretrained: PretrainedArg = False,
        stage_indices: Sequence[int] | None = None,
        num_classes: int | None = None,
        final_features: bool = False,
        img_size: ImageSize | None = None,
    ) -> None:
        super().__init__()
        check_backbone_name(name)
        model, sized = build_timm_model(name, pretrained, img_size)
        keep_head = num_classes is not None
        plan = plan_stages(model, name, stage_indices, final_features, keep_head)
        self._runner = plan.runner
        self.family = plan.family
        # Swin's maps are (B, H, W, C) between its stages and at its head.
        self._channels_last = isinstance(plan.runner, ChildSegments) and plan.runner.channels_last
        self.keeps_head = keep_head
        # Module paths of timm's classifier: their keys in a weights file never have to fit.
        self._classifier: tuple[str, ...] = ()
        if num_classes is not None:
            model.reset_classifier(num_classes)
            classifier = model.get_classifier()
            self._classifier = tuple(p for p, m in model.named_modules() if m is classifier and p)
        self._dropped = plan.dropped
        for path in plan.dropped:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, nn.Identity())

        self.name = name
        self.model = model
        self.num_feature_stages = plan.num_feature_stages
        self.stage_indices = plan.indices
        self.stage_names = tuple(f"stage{i + 1}" for i in plan.indices)
        self.stage_channels = plan.channels
        self.stage_reductions = plan.reductions
        cfg = timm.data.resolve_model_data_config(model)
        self.data_config: dict[str, Any] = {
            "mean": tuple(float(v) for v in cfg["mean"]),
            "std": tuple(float(v) for v in cfg["std"]),
            "input_size": tuple(int(v) for v in cfg["input_size"]),
            "crop_pct": float(cfg["crop_pct"]),
            "interpolation": str(cfg["interpolation"]),
        }
        if sized:  # timm's config names the size of its weights, not the one built here
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or ())
            self.data_config["input_size"] = (3, *(int(s) for s in size))
        if pretrained is not False and pretrained is not True:
            self.load_weights(pretrained)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a timm-format state dict of this backbone, ignoring keys of dropped modules.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            PretrainedWeightsError: unreadable file, or keys/shapes that do not match.
        """
        state = load_weights_file(path)
        # A kept classifier has K outputs, the file's usually ImageNet's 1000: it stays as reset.
        ignored = tuple(p + "." for p in (*self._dropped, *self._classifier))
        if self.family != CNN:
            kept = {k: v for k, v in state.items() if not k.startswith(ignored)}
            state = self._adapt_weights(kept)
        own = {k: v for k, v in self.model.state_dict().items() if not k.startswith(ignored)}
        unexpected = [k for k in state if k not in own and not k.startswith(ignored)]
        # Converted checkpoints often omit BN's step counter; it does not affect the weights.
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if unexpected or missing or mismatched:
            parts = []
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            ):
                if keys:
                    parts.append(f"{len(keys)} {label} (e.g. {keys[:3]})")
            raise PretrainedWeightsError(
                f"Weights in {str(path)!r} do not fit backbone {self.name!r}: "
                + "; ".join(parts)
                + f". The file must hold timm.create_model({self.name!r}).state_dict() "
                "(classifier keys may be present; they are ignored)."
            )
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        logger.info("Loaded backbone weights for %s from %s", self.name, path)

    def _adapt_weights(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """timm's own conversion of a Transformer's weights to the size this model is built
        for (``checkpoint_filter_fn``: ViT's position embedding, Swin's relative position
        tables resampled), as ``timm.create_model(..., pretrained=True)`` applies it."""
        module = sys.modules.get(type(self.model).__module__)
        convert = getattr(module, "checkpoint_filter_fn", None)
        if convert is None:
            return state
        try:
            return dict(convert(state, self.model))
        except Exception as err:  # timm's converters assume their own checkpoint layouts
            raise PretrainedWeightsError(
                f"timm could not adapt the weights of {self.name!r} to this model "
                f"({type(err).__name__}: {err}); the file must hold "
                f"timm.create_model({self.name!r}).state_dict()."
            ) from err

    @property
    def num_stages(self) -> int:
        """Number of selected stages (segments)."""
        return len(self.stage_indices)

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Parameters of timm's kept classifier (empty when the head was dropped)."""
        return [p for path in self._classifier for p in self.model.get_submodule(path).parameters()]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace timm's kept classifier with a fresh one for ``num_classes`` (same device)."""
        self._require_head()
        ref = next(self.model.parameters())
        self.model.reset_classifier(num_classes)
        classifier = self.model.get_classifier()
        classifier.to(device=ref.device, dtype=ref.dtype)
        self._classifier = tuple(p for p, m in self.model.named_modules() if m is classifier and p)

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's ``forward_features``: (B, 3, H, W) -> the last stage's features.

        Only with a kept head (``num_classes``); for EfficientNet-like models this includes
        the final 1x1 conv (``conv_head``/``bn2``) that the staged forward drops. A (B, C, h, w)
        map (Swin's channels-last map is permuted to it); a plain ViT's (B, T, C) tokens.
        """
        self._require_head()
        features = self.model.forward_features(x)
        # (B, h, w, C) -> (B, C, h, w)
        return features.permute(0, 3, 1, 2) if self._channels_last else features

    def forward_head(self, x: Tensor) -> Tensor:
        """timm's ``forward_head`` on :meth:`forward_features`: pooling and classifier -> (B, K)."""
        self._require_head()
        return self.model.forward_head(x.permute(0, 2, 3, 1) if self._channels_last else x)

    def _require_head(self) -> None:
        if not self.keeps_head:
            raise RuntimeError(
                f"This {self.name!r} backbone was built without timm's head; pass num_classes to "
                "StagedBackbone to keep it."
            )

    def forward_segment(self, index: int, x: Any) -> Any:
        """Run segment ``index``: from the previous selected stage's output to this one's.

        Args:
            index: The segment.
            x: (B, 3, H, W) images for segment 0; else the previous segment's output, or
                :meth:`with_map` of it.

        Returns:
            The stage's output in the backbone's own layout; :meth:`stage_map` gives its map.
        """
        return self._runner.run(self.model, index, x)

    def stage_map(self, state: Any) -> Tensor:
        """The (B, C, H, W) map of a segment's output (the output itself for a CNN)."""
        return self._runner.stage_map(state)

    def with_map(self, state: Any, x: Tensor) -> Any:
        """The next segment's input: ``state`` with its map replaced by ``x`` (B, C, H, W).

        A CNN's is ``x`` itself; Swin's ``x`` channels-last; a ViT's the same class and
        register tokens followed by ``x``'s pixels as patch tokens.
        """
        return self._runner.with_map(state, x)

    def forward(
        self, x: Tensor, hook: Callable[[int, Tensor], Tensor] | None = None
    ) -> list[Tensor]:
        """Run all segments and return the selected stages' (B, C, H, W) maps.

        Args:
            x: (B, 3, H, W) images; any size the backbone's strides allow.
            hook: Optional ``hook(i, feature) -> next_map``; its return value, not the
                feature, is what segment ``i + 1`` reads.

        Returns:
            The maps of the selected stages (before ``hook``), in order.
        """
        outputs = []
        state: Any = x
        for i in range(self.num_stages):
            state = self.forward_segment(i, state)
            fmap = self.stage_map(state)
            outputs.append(fmap)
            if hook is not None:
                state = self.with_map(state, hook(i, fmap))
        return outputs
