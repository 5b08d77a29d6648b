"""How a timm model is built and split into stages: the plan :class:`StagedBackbone` runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from crasmra.backbones.families import (
    TOKENS,
    TokenSegments,
    backbone_family,
    size_options,
    token_stage_ends,
    token_tail,
)
from crasmra.backbones.segments import (
    ChildSegments,
    feature_info,
    feature_tail,
    plan_segments,
    resolve_stage_indices,
)
from crasmra.backbones.weights import PretrainedArg, check_backbone_name, create_timm_model

__all__ = ["StagePlan", "build_timm_model", "check_backbone", "plan_stages", "timm_size_options"]

ImageSize = int | Sequence[int]


@dataclass(frozen=True)
class StagePlan:
    """Where a model's stages end and how they run.

    Attributes:
        family: ``"cnn"``, ``"hierarchical"`` or ``"tokens"`` (see
            :mod:`crasmra.backbones.families`).
        indices: The attended feature_info indices.
        runner: Runs segment ``i`` and converts its output to and from ``(B, C, H, W)``.
        channels: Channels of each attended stage's map.
        reductions: Stride of each attended stage's map, from feature_info.
        dropped: Module paths the staged forward never calls (replaced by ``nn.Identity``).
        num_feature_stages: Length of the model's feature_info.
    """

    family: str
    indices: tuple[int, ...]
    runner: ChildSegments | TokenSegments
    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    dropped: tuple[str, ...]
    num_feature_stages: int


def timm_size_options(name: str, img_size: ImageSize | None) -> dict[str, object]:
    """The ``timm.create_model`` options crasmra builds ``name`` with for ``img_size`` px:
    none for a CNN; ``img_size`` and dynamic sizes for a Transformer timm pins to one size
    (see :func:`~crasmra.backbones.families.size_options`). For scripts that build timm's
    own model beside crasmra's, e.g. the plain classifier in the benchmarks."""
    with torch.device("meta"):  # the class and its default config, without memory
        probe = timm.create_model(name, pretrained=False)
    return size_options(probe, name, img_size)


def build_timm_model(
    name: str, pretrained: PretrainedArg = False, img_size: ImageSize | None = None
) -> tuple[nn.Module, bool]:
    """Build ``name`` the way crasmra runs it: a Transformer timm pins to one input size is
    built for ``img_size``, with dynamic sizes on (see
    :func:`~crasmra.backbones.families.size_options`).

    Returns:
        The model, and whether it was built for ``img_size`` (False for CNNs, which take any
        size, and when ``img_size`` is None).
    """
    options = timm_size_options(name, img_size)
    return create_timm_model(name, pretrained, **options), "img_size" in options


def _check_final(name: str, final_features: bool, indices: Sequence[int], count: int) -> None:
    if final_features and indices[-1] != count - 1:
        raise ValueError(
            f"final_features needs the last attended stage to be {name!r}'s last "
            f"feature stage (index {count - 1}); stage_indices are {list(indices)}."
        )


def plan_stages(
    model: nn.Module,
    name: str,
    stage_indices: Sequence[int] | None = None,
    final_features: bool = False,
    keep_head: bool = False,
) -> StagePlan:
    """Split ``model`` at ``stage_indices`` (None: the last three stages; a plain ViT's blocks
    in four groups, the last three attended, see
    :func:`~crasmra.backbones.families.token_stage_ends`).

    Args:
        model: The timm model.
        name: Its name, for messages.
        stage_indices: feature_info indices whose outputs are attended.
        final_features: The last stage runs on to where timm's ``forward_features`` ends.
        keep_head: timm's head stays (the plain variant): nothing is dropped.

    Raises:
        ValueError: too few stages, bad indices, or a model that cannot be split.
    """
    family = backbone_family(model)
    info = feature_info(model, name)
    final = final_features and not keep_head
    if family == TOKENS:
        TokenSegments.check(model, name)
        indices = resolve_stage_indices(
            len(info), stage_indices, name, default=token_stage_ends(len(info))
        )
        _check_final(name, final, indices, len(info))
        return StagePlan(
            family=family,
            indices=indices,
            runner=TokenSegments(indices, int(model.num_prefix_tokens), final_norm=final),
            channels=tuple(int(info[i]["num_chs"]) for i in indices),
            reductions=tuple(int(info[i]["reduction"]) for i in indices),
            dropped=() if keep_head else token_tail(model, indices[-1], final),
            num_feature_stages=len(info),
        )
    indices = resolve_stage_indices(len(info), stage_indices, name)
    segments, tail = plan_segments(model, [info[i]["module"] for i in indices], name)
    channels = [int(info[i]["num_chs"]) for i in indices]
    _check_final(name, final, indices, len(info))
    extra = feature_tail(tail) if final else ()
    if extra:
        segments = (*segments[:-1], (*segments[-1], *extra))
        tail = tuple(p for p in tail if p not in extra)
        channels[-1] = int(model.num_features)
    # Swin keeps (B, H, W, C) maps between its stages (timm's output_fmt "NHWC").
    channels_last = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
    return StagePlan(
        family=family,
        indices=indices,
        runner=ChildSegments(segments, channels_last=channels_last),
        channels=tuple(channels),
        reductions=tuple(int(info[i]["reduction"]) for i in indices),
        dropped=() if keep_head else tail,
        num_feature_stages=len(info),
    )


def check_backbone(
    name: str, stage_indices: Sequence[int] | None = None, img_size: ImageSize | None = None
) -> tuple[int, ...]:
    """Check that ``name`` can be split at ``stage_indices`` without building it for real.

    The model is instantiated on the ``meta`` device (no memory, no weights).

    Returns:
        The resolved stage indices.

    Raises:
        ValueError: unknown name, too few feature stages, bad indices or an unsplittable model.
    """
    check_backbone_name(name)
    with torch.device("meta"):
        model, _ = build_timm_model(name, False, img_size)
    return plan_stages(model, name, stage_indices).indices
