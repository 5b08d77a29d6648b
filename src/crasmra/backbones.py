"""A timm CNN split into ordered stages, so a module can act between two stages.

CRAM must transform a stage's output *before* the next stage reads it, which timm's
``features_only`` wrappers cannot do (they only tap outputs). :class:`StagedBackbone` keeps the
timm model itself (so its state dict keys stay timm's, prefixed by ``model.``) and runs its
top-level modules in registration order, the way timm's ``FeatureListNet`` does, stopping at
each selected feature stage. Stage channels and strides come from the model's ``feature_info``.

Supported: timm CNNs whose feature forward is "call the children in order", with feature taps
on children or inside top-level ``nn.Sequential`` containers: ResNet/ResNeXt, DenseNet,
ConvNeXt, EfficientNet/MobileNet, RegNet and the like. Stage naming follows SPEC: feature_info
index ``i`` (0-based) is ``"stage{i+1}"``, so ResNet's stem is stage1 and layer2..layer4 are
stage3..stage5.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from crasmra.errors import CrasmraError

__all__ = [
    "PretrainedWeightsError",
    "StagedBackbone",
    "check_backbone",
    "check_backbone_name",
    "load_weights_file",
    "resolve_stage_indices",
]

logger = logging.getLogger(__name__)

PretrainedArg = bool | str | os.PathLike

# Extensions read by :func:`load_weights_file`; everything else is refused rather than guessed.
_TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")


class PretrainedWeightsError(CrasmraError, RuntimeError):
    """Pretrained weights could not be obtained or do not fit the backbone."""


def _offline_hint(name: str) -> str:
    return (
        f"Could not load timm's pretrained weights for {name!r} (offline or not cached?). "
        "Either pass a local weights file, e.g. "
        "create_model(..., pretrained='/path/to/weights.safetensors') (.pth/.pt/.bin also work; "
        f"save it on a connected machine with timm.create_model({name!r}, pretrained=True) and "
        "safetensors.torch.save_file(model.state_dict(), path)), or point the caches at a copy "
        "that holds the weights: HF_HOME or HF_HUB_CACHE (Hugging Face hub weights), TORCH_HOME "
        "(weights fetched by URL), and set HF_HUB_OFFLINE=1 to read the cache without network."
    )


def check_backbone_name(name: str) -> None:
    """Raise ValueError, with suggestions, if ``name`` is not a timm model (with a valid tag).

    ``name`` may carry a pretrained tag (``"resnet50.tv_in1k"``); ``timm.is_model`` checks
    only the architecture, so the tag is checked against timm's registry here (no network).
    """
    if not isinstance(name, str) or not timm.is_model(name):
        arch = str(name).split(".")[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Unknown backbone {name!r}: not a timm model name.{hint} "
            "See timm.list_models() for the available names."
        )
    arch, _, tag = name.partition(".")
    if not tag:
        return
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # timm's "Invalid pretrained tag"
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        known = f"timm's tags for it: {tags}" if tags else "timm has no pretrained tags for it"
        raise ValueError(
            f"Unknown pretrained tag {tag!r} in backbone {name!r}; {known}. Name one of them "
            f"(e.g. {arch}.{tags[0] if tags else '<tag>'}) or give the bare name {arch!r}."
        ) from err


def _feature_info(model: nn.Module, name: str) -> list[dict[str, Any]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        # Vision transformers (ViT, DeiT, Swin, ...): timm pins their input size, and their
        # blocks output token sequences rather than the (N, C, H, W) maps CRAM and SMRAM need.
        size = "x".join(str(s) for s in cfg.get("input_size", ())[1:]) or "one"
        raise ValueError(
            f"Backbone {name!r} ({type(model).__name__}) takes only {size} px inputs and has no "
            "convolutional feature stages; crasmra needs a timm CNN whose stages output "
            "(N, C, H, W) feature maps at any input size, e.g. resnet50, efficientnet_b0, "
            "convnext_tiny or densenet161."
        )
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(
            f"Backbone {name!r} exposes no feature_info; use a timm CNN with feature stages "
            "(e.g. resnet50, densenet161, convnext_tiny)."
        )
    return [dict(info[i]) for i in range(len(info))]


def resolve_stage_indices(
    num_stages: int, stage_indices: Sequence[int] | None, name: str = "backbone"
) -> tuple[int, ...]:
    """Check or default the 0-based feature_info indices that get attention and heads.

    Args:
        num_stages: Length of the backbone's feature_info.
        stage_indices: Requested indices (negative ones count from the end), or None for the
            last three.
        name: Backbone name, for messages.

    Returns:
        Strictly increasing, non-negative indices.
    """
    if num_stages < 3:
        raise ValueError(
            f"Backbone {name!r} has {num_stages} feature stages; CRA-SMRA needs at least 3. "
            "Choose a CNN with a deeper feature hierarchy (e.g. resnet50)."
        )
    if stage_indices is None:
        return tuple(range(num_stages - 3, num_stages))
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


def _ordered_paths(module: nn.Module, taps: Sequence[str], prefix: str = "") -> list[str]:
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
            paths.extend(_ordered_paths(child, taps, path + "."))
        else:
            paths.append(path)
    return paths


def _plan_segments(
    model: nn.Module, taps: Sequence[str], name: str
) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """Split the ordered module paths into one segment per tap, plus the unused tail."""
    paths = _ordered_paths(model, taps)
    segments, start = [], 0
    for tap in taps:
        if tap not in paths[start:]:
            raise ValueError(f"Feature module {tap!r} of {name!r} is not reachable in order")
        end = paths.index(tap, start) + 1
        segments.append(tuple(paths[start:end]))
        start = end
    return tuple(segments), tuple(paths[start:])


#: Names of timm's pooling and classifier modules: where ``forward_features`` ends.
_HEAD_MODULES = frozenset({
    "global_pool", "head", "fc", "classifier", "head_drop", "flatten", "fc_norm",
    "pre_logits", "last_linear",
})


def _feature_tail(tail: Sequence[str]) -> tuple[str, ...]:
    """The modules after the last feature stage that timm's ``forward_features`` still runs.

    Those before the first pooling or classifier module: EfficientNet's ``conv_head`` and
    ``bn2`` (the 1x1 convolution to the 1280 features its classifier reads), ConvNeXt's
    ``norm_pre``, RegNet's ``final_conv``; nothing for ResNet or MobileNetV3, whose pooling
    comes first.
    """
    kept = []
    for path in tail:
        if path.rsplit(".", 1)[-1] in _HEAD_MODULES:
            break
        kept.append(path)
    return tuple(kept)


def _create_timm_model(name: str, pretrained: PretrainedArg) -> nn.Module:
    if pretrained is True:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # any download/cache failure surfaces as one clear error
            raise PretrainedWeightsError(_offline_hint(name)) from err
        # A bare name takes timm's default tag, which differs between architectures (e.g.
        # resnet50.a1_in1k, a timm training recipe, but densenet161.tv_in1k); name the weights.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        logger.info(
            "Backbone weights: timm's %s.%s", cfg.get("architecture", name), cfg.get("tag")
        )
        return model
    return timm.create_model(name, pretrained=False)


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a safetensors or torch file without unpickling arbitrary objects.

    ``.safetensors`` is read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` with
    ``torch.load(weights_only=True)``. A checkpoint dict holding ``"state_dict"`` or ``"model"``
    is unwrapped, and a DistributedDataParallel ``"module."`` prefix is removed.

    Args:
        path: Weights file.

    Returns:
        Mapping from parameter/buffer names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pretrained weights file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        elif suffix in _TORCH_EXTENSIONS:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise PretrainedWeightsError(
                f"Unsupported weights file {str(path)!r}: use .safetensors, "
                f"or a torch state dict with one of {_TORCH_EXTENSIONS}."
            )
    except PretrainedWeightsError:
        raise
    except Exception as err:  # corrupt file, pickled objects, bad safetensors header
        raise PretrainedWeightsError(
            f"Could not read weights from {str(path)!r}: {err}. Only plain tensor state dicts "
            "are loaded (safetensors, or torch.load with weights_only=True); re-save the "
            "weights with safetensors.torch.save_file(model.state_dict(), path)."
        ) from err
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_backbone(name: str, stage_indices: Sequence[int] | None = None) -> tuple[int, ...]:
    """Check that ``name`` can be split at ``stage_indices`` without building it for real.

    The model is instantiated on the ``meta`` device (no memory, no weights).

    Returns:
        The resolved stage indices.

    Raises:
        ValueError: unknown name, too few feature stages, bad indices or an unsplittable model.
    """
    check_backbone_name(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    info = _feature_info(model, name)
    indices = resolve_stage_indices(len(info), stage_indices, name)
    _plan_segments(model, [info[i]["module"] for i in indices], name)
    return indices


class StagedBackbone(nn.Module):
    """A timm CNN run stage by stage.

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
        stage_indices: 0-based feature_info indices to expose; default the last three.
        num_classes: None (default) to drop timm's head; an int to keep timm's own head
            (``forward_head``) with its classifier reset to that many classes.
        final_features: The last selected stage (which must be the model's last feature
            stage) runs on to where timm's ``forward_features`` ends, so that it gives the
            features timm's classifier reads: EfficientNet's 1280 channels after ``conv_head``
            and ``bn2`` instead of its last block's 320 (see :func:`_feature_tail`). No change
            for models whose last stage is already that (ResNet).

    Attributes:
        model: The (trimmed) timm model; its state dict keys are timm's.
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
    ) -> None:
        super().__init__()
        check_backbone_name(name)
        model = _create_timm_model(name, pretrained)
        info = _feature_info(model, name)
        indices = resolve_stage_indices(len(info), stage_indices, name)
        taps = [info[i]["module"] for i in indices]
        self._segments, tail = _plan_segments(model, taps, name)
        channels = [int(info[i]["num_chs"]) for i in indices]
        if final_features and num_classes is None:
            if indices[-1] != len(info) - 1:
                raise ValueError(
                    f"final_features needs the last attended stage to be {name!r}'s last "
                    f"feature stage (index {len(info) - 1}); stage_indices are {list(indices)}."
                )
            extra = _feature_tail(tail)
            if extra:
                self._segments = (*self._segments[:-1], (*self._segments[-1], *extra))
                tail = tuple(p for p in tail if p not in extra)
                channels[-1] = int(model.num_features)
        self.keeps_head = num_classes is not None
        # Module paths of timm's classifier: their keys in a weights file never have to fit.
        self._classifier: tuple[str, ...] = ()
        if num_classes is not None:
            model.reset_classifier(num_classes)
            tail = ()
            classifier = model.get_classifier()
            self._classifier = tuple(p for p, m in model.named_modules() if m is classifier and p)
        self._dropped = tail
        for path in tail:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, nn.Identity())

        self.name = name
        self.model = model
        self.num_feature_stages = len(info)
        self.stage_indices = indices
        self.stage_names = tuple(f"stage{i + 1}" for i in indices)
        self.stage_channels = tuple(channels)
        self.stage_reductions = tuple(int(info[i]["reduction"]) for i in indices)
        cfg = timm.data.resolve_model_data_config(model)
        self.data_config: dict[str, Any] = {
            "mean": tuple(float(v) for v in cfg["mean"]),
            "std": tuple(float(v) for v in cfg["std"]),
            "input_size": tuple(int(v) for v in cfg["input_size"]),
            "crop_pct": float(cfg["crop_pct"]),
            "interpolation": str(cfg["interpolation"]),
        }
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

    @property
    def num_stages(self) -> int:
        """Number of selected stages (segments)."""
        return len(self._segments)

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
        """timm's ``forward_features``: (B, 3, H, W) -> the last stage's (B, C, h, w) map.

        Only with a kept head (``num_classes``); for EfficientNet-like models this includes
        the final 1x1 conv (``conv_head``/``bn2``) that the staged forward drops.
        """
        self._require_head()
        return self.model.forward_features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """timm's ``forward_head``: global pooling and classifier, (B, C, h, w) -> (B, K)."""
        self._require_head()
        return self.model.forward_head(x)

    def _require_head(self) -> None:
        if not self.keeps_head:
            raise RuntimeError(
                f"This {self.name!r} backbone was built without timm's head; pass num_classes to "
                "StagedBackbone to keep it."
            )

    def forward_segment(self, index: int, x: Tensor) -> Tensor:
        """Run segment ``index``: from the previous selected stage's output to this one's."""
        for path in self._segments[index]:
            x = self.model.get_submodule(path)(x)
        return x

    def forward(
        self, x: Tensor, hook: Callable[[int, Tensor], Tensor] | None = None
    ) -> list[Tensor]:
        """Run all segments and return the selected stage outputs.

        Args:
            x: (B, 3, H, W) images; any size the backbone's strides allow.
            hook: Optional ``hook(i, feature) -> next_input``; its return value, not the
                feature, is what segment ``i + 1`` reads.

        Returns:
            The outputs of the selected stages (before ``hook``), in order.
        """
        outputs = []
        for i in range(self.num_stages):
            x = self.forward_segment(i, x)
            outputs.append(x)
            if hook is not None:
                x = hook(i, x)
        return outputs
