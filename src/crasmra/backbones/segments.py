"""Where a timm backbone's stages end, and how a model whose stages are its children runs.

Stage naming follows SPEC: feature_info index ``i`` (0-based) is ``"stage{i+1}"``, so ResNet's
stem is stage1 and layer2..layer4 are stage3..stage5; a plain ViT has one feature_info entry
per block, so its stage ``k`` ends after block ``k``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

__all__ = [
    "HEAD_MODULES",
    "ChildSegments",
    "feature_info",
    "feature_tail",
    "ordered_paths",
    "plan_segments",
    "resolve_stage_indices",
]


def feature_info(model: nn.Module, name: str) -> list[dict[str, Any]]:
    """timm's ``feature_info`` of ``model`` as a list of dicts (num_chs, reduction, module)."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(
            f"Backbone {name!r} exposes no feature_info; use a timm model with feature stages "
            "(e.g. resnet50, densenet161, convnext_tiny, swin_tiny_patch4_window7_224)."
        )
    return [dict(info[i]) for i in range(len(info))]


def resolve_stage_indices(
    num_stages: int,
    stage_indices: Sequence[int] | None,
    name: str = "backbone",
    default: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Check or default the 0-based feature_info indices that get attention and heads.

    Args:
        num_stages: Length of the backbone's feature_info.
        stage_indices: Requested indices (negative ones count from the end), or None for
            ``default``.
        name: Backbone name, for messages.
        default: The indices None stands for; None for the last three.

    Returns:
        Strictly increasing, non-negative indices.
    """
    if num_stages < 3:
        raise ValueError(
            f"Backbone {name!r} has {num_stages} feature stages; CRA-SMRA needs at least 3. "
            "Choose a CNN with a deeper feature hierarchy (e.g. resnet50)."
        )
    if stage_indices is None:
        return tuple(default) if default is not None else tuple(range(num_stages - 3, num_stages))
    if isinstance(stage_indices, int | str) or len(stage_indices) == 0:
        raise ValueError(
            f"stage_indices must be a non-empty sequence of ints, got {stage_indices!r}"
        )
    resolved = []
    for idx in stage_indices:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"stage_indices must hold ints, got {idx!r}")
        if not -num_stages <= idx < num_stages:
            raise ValueError(
                f"stage index {idx} is out of range for {name!r}, which has {num_stages} feature "
                f"stages (valid: 0..{num_stages - 1})"
            )
        resolved.append(idx % num_stages)
    if any(b <= a for a, b in itertools.pairwise(resolved)):
        raise ValueError(f"stage_indices must be strictly increasing, got {list(stage_indices)}")
    return tuple(resolved)


def ordered_paths(module: nn.Module, taps: Sequence[str], prefix: str = "") -> list[str]:
    """List module paths in execution order, descending into Sequentials that hold a tap.

    Mirrors timm's ``_module_list(flatten_sequential=True)``: a tap nested in an
    ``nn.Sequential`` is reachable because a Sequential runs its children in order; a tap inside
    any other container is not, since we cannot know how that container calls it.
    """
    paths = []
    for child_name, child in module.named_children():
        path = f"{prefix}{child_name}"
        if any(t.startswith(path + ".") for t in taps):
            if not isinstance(child, nn.Sequential):
                raise ValueError(
                    f"Feature stage inside {path!r} ({type(child).__name__}) cannot be split "
                    "out: only taps on a model's children or inside nn.Sequential are supported."
                )
            paths.extend(ordered_paths(child, taps, path + "."))
        else:
            paths.append(path)
    return paths


def plan_segments(
    model: nn.Module, taps: Sequence[str], name: str
) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """Split the ordered module paths into one segment per tap, plus the unused tail."""
    paths = ordered_paths(model, taps)
    segments, start = [], 0
    for tap in taps:
        if tap not in paths[start:]:
            raise ValueError(f"Feature module {tap!r} of {name!r} is not reachable in order")
        end = paths.index(tap, start) + 1
        segments.append(tuple(paths[start:end]))
        start = end
    return tuple(segments), tuple(paths[start:])


#: Names of timm's pooling and classifier modules: where ``forward_features`` ends.
HEAD_MODULES = frozenset({
    "global_pool", "head", "fc", "classifier", "head_drop", "flatten", "fc_norm",
    "pre_logits", "last_linear",
})


def feature_tail(tail: Sequence[str]) -> tuple[str, ...]:
    """The modules after the last feature stage that timm's ``forward_features`` still runs.

    Those before the first pooling or classifier module: EfficientNet's ``conv_head`` and
    ``bn2`` (the 1x1 convolution to the 1280 features its classifier reads), ConvNeXt's
    ``norm_pre``, RegNet's ``final_conv``; nothing for ResNet or MobileNetV3, whose pooling
    comes first.
    """
    kept = []
    for path in tail:
        if path.rsplit(".", 1)[-1] in HEAD_MODULES:
            break
        kept.append(path)
    return tuple(kept)


class ChildSegments:
    """Runs a model whose forward calls its children in order, one segment per stage.

    Segment ``i`` calls the module paths ``segments[i]`` in turn. CNNs, and hierarchical
    Transformers (Swin, Swin-V2) whose stages are children too. Swin keeps its maps
    channels-last, ``(B, H, W, C)`` (timm's ``output_fmt`` ``"NHWC"``); :meth:`stage_map` and
    :meth:`with_map` convert between that and the ``(B, C, H, W)`` the attention modules read.

    Args:
        segments: Module paths per segment, in execution order.
        channels_last: The stages take and give ``(B, H, W, C)`` maps.
    """

    def __init__(self, segments: Sequence[Sequence[str]], channels_last: bool = False) -> None:
        self.segments = tuple(tuple(s) for s in segments)
        self.channels_last = channels_last

    def run(self, model: nn.Module, index: int, x: Tensor) -> Tensor:
        """Segment ``index`` of ``model`` on ``x`` (images, or the previous :meth:`with_map`)."""
        for path in self.segments[index]:
            x = model.get_submodule(path)(x)
        return x

    def stage_map(self, state: Tensor) -> Tensor:
        """The ``(B, C, H, W)`` map of a segment's output (or input)."""
        # (B, H, W, C) -> (B, C, H, W): a view, no copy.
        return state.permute(0, 3, 1, 2) if self.channels_last else state

    def with_map(self, state: Tensor, x: Tensor) -> Tensor:
        """The next segment's input: ``x``, a ``(B, C, H, W)`` map, in the stages' layout."""
        return x.permute(0, 2, 3, 1) if self.channels_last else x
