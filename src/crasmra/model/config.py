"""The network's hyperparameters: :class:`NetConfig`, its defaults and its checks.

Below the networks themselves so that a configuration can be read, checked and recorded
without building anything (the command line, checkpoints and sweeps all start here).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crasmra.backbones import check_backbone
from crasmra.layers import (
    CONV_LAYERS,
    DEFAULT_DELTA,
    DEFAULT_OMEGA,
    DEFAULT_REDUCTION,
    HEAD_POOLS,
    SUPPRESS_SOURCES,
    attention_names,
    check_delta,
    check_omega,
    check_suppress_top_k,
)

__all__ = [
    "PAPER_VARIANTS",
    "PAPER_VARIANTS_ATTENTION",
    "PLAIN",
    "VARIANTS",
    "NetConfig",
    "attention_of",
    "is_int",
    "normalized_head_weights",
    "validate_hparams",
    "variant_names",
]

#: The paper's ablation (Table 3): variant -> the registered attention module after each stage.
#: ``"cram"`` and ``"cra-smra"`` build the same network; SMRAM is the training engine's choice
#: (see :func:`crasmra.losses.trains_with_smram`).
PAPER_VARIANTS_ATTENTION: dict[str, str] = {
    "baseline": "identity",
    "cbam": "cbam",
    "cram": "cram",
    "cra-smra": "cram",
}
#: The four variants of the paper's ablation (Table 3).
PAPER_VARIANTS: tuple[str, ...] = tuple(PAPER_VARIANTS_ATTENTION)
#: The reference variant: timm's own classifier on the last stage, plain cross-entropy.
PLAIN = "plain"
#: The built-in variants. Every registered attention module is a variant too (its name).
VARIANTS: tuple[str, ...] = (PLAIN, *PAPER_VARIANTS)
#: Every built-in variant's attention module; a registered module's variant is its own name.
_ATTENTION: dict[str, str | None] = {PLAIN: None, **PAPER_VARIANTS_ATTENTION}


def variant_names() -> tuple[str, ...]:
    """Every variant a network can be built as: :data:`VARIANTS`, then further registered
    attention modules under their own names (``identity`` is ``baseline``, ``cram`` a paper
    variant)."""
    named = set(PAPER_VARIANTS_ATTENTION.values()) | set(VARIANTS)
    return (*VARIANTS, *(n for n in attention_names() if n not in named))


def attention_of(variant: str) -> str | None:
    """The registered attention module of ``variant`` (None for ``"plain"``)."""
    return _ATTENTION.get(variant, variant)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalized_head_weights(weights: Sequence[float]) -> list[float]:
    """``weights`` divided by their sum; ValueError unless finite, >= 0 and summing above 0."""
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as err:
        raise ValueError(f"head_weights must be a list of numbers, got {weights!r}.") from err
    if not values or any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(
            f"head_weights must be finite numbers >= 0 with a positive sum, got {weights!r}; "
            "change --model.net.head_weights."
        )
    total = sum(values)
    return [w / total for w in values]


@dataclass
class NetConfig:
    """Every hyperparameter of the network, its default and its check, in one place.

    The training engine's ``--model.net.*`` options take their defaults from here, and a
    checkpoint's ``net_config`` is :meth:`as_dict` of it. Constructing one validates it.

    Attributes:
        backbone: timm model name with at least three feature stages: a CNN, a Swin or a
            plain ViT (see :mod:`crasmra.backbones`).
        num_classes: Number of classes K.
        variant: One of :func:`variant_names`.
        pretrained: False (random init), True (timm ImageNet weights by name) or a path to a
            local timm-format backbone state dict.
        stage_indices: 0-based feature_info indices to attend; None for the last three
            (ResNet: layer2..layer4 = SPEC stages 3..5).
        head_channels: C_a, the width every attended stage is projected to (SPEC open point).
            512: PMG uses 1024, but 512 halves the projection cost (about 1.4 vs 2.9 GMACs on
            ResNet50 at 448 px with the light Conv_layer), keeping the network within ~1.1x
            the plain backbone's FLOPs.
        head_hidden: Hidden width of every head's MLP (PMG: 512).
        head_pool: Global pooling before the heads, ``"max"`` (as PMG) or ``"avg"``.
        conv_layer: Conv_layer after the attention, ``"light"`` (1x1 conv + BN + ReLU) or
            ``"pmg"`` (PMG's 1x1 -> 3x3 block, about 4x the cost).
        reduction: r of CRAM's / CBAM's channel MLP; 16, CBAM's usual value, not stated by the
            paper.
        omega: CRAM's suppression factor (paper: 0.5).
        delta: CRAM's relative importance threshold (paper: 0.9).
        suppress_source: What CRAM's mask S multiplies to give the next stage's input x_s
            (SPEC open point): ``"input"``, ``x_s = S * X``; ``"enhanced"``,
            ``x_s = S * (I * X)``. See :class:`~crasmra.layers.CRAM`.
        suppress_top_k: None (the paper's): CRAM's mask damps the channels within ``delta`` of
            the most important one. An integer k: exactly the k channels with the largest
            importance logits, whatever ties the float32 sigmoid makes (see
            :func:`~crasmra.layers.cram.top_k_suppression_mask`). Ours.
        attention_options: Further keyword options of the attention module, for modules
            registered with options of their own (see :mod:`crasmra.layers.registry`).
        final_features: The last attended stage runs on to where timm's ``forward_features``
            ends, so that its head reads the features the pretrained classifier reads
            (EfficientNet: 1280 channels after its final 1x1 convolution, instead of the last
            block's 320); no change for ResNets. Ours, for backbones whose last feature stage
            is not their final feature map.
        img_size: The input size (int or ``[h, w]``) a Transformer that timm builds for one
            size is built for (Swin's attention windows, ViT's position embedding); it still
            runs at other sizes. None: timm's default (224 for most). The command line sets it
            from ``--data.image_size``. CNNs ignore it.
        head_weights: Weights of the heads (stage heads, then concat; plain: its one head)
            in the combined prediction, non-negative, normalised to sum 1; None for the
            paper's mean of the softmaxes. Set by ``--model.finetune.combine fitted``
            (:func:`crasmra.finetune.fit_head_weights`) or given by hand, e.g.
            ``[0, 0, 1, 0]`` for the stage-5 head alone.
    """

    backbone: str = "resnet50"
    num_classes: int = 200
    variant: str = "cra-smra"
    pretrained: bool | str = False
    stage_indices: list[int] | None = None
    head_channels: int = 512
    head_hidden: int = 512
    head_pool: str = "max"
    conv_layer: str = "light"
    reduction: int = DEFAULT_REDUCTION
    omega: float = DEFAULT_OMEGA
    delta: float = DEFAULT_DELTA
    suppress_source: str = "input"
    suppress_top_k: int | None = None
    attention_options: dict[str, Any] | None = None
    final_features: bool = False
    img_size: int | list[int] | None = None
    head_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.stage_indices is not None:
            self.stage_indices = list(self.stage_indices)
        if isinstance(self.img_size, tuple):
            self.img_size = list(self.img_size)
        self.check()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> NetConfig:
        """Build from keyword arguments; an unknown name is a ValueError naming the valid ones."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"Unknown hyperparameter(s) {unknown}; valid names are {sorted(cls.field_names())}."
            )
        return cls(**kwargs)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """The names of the fields, in order."""
        return tuple(f.name for f in dataclasses.fields(NetConfig))

    def check(self) -> None:
        """Validate everything that does not need the backbone; raise ValueError with a fix."""
        variants = variant_names()
        if self.variant not in variants:
            raise ValueError(
                f"Unknown variant {self.variant!r}; choose one of {variants} "
                "(--model.net.variant)."
            )
        if not is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(
                f"num_classes must be an int >= 1, got {self.num_classes!r}; change "
                "--model.net.num_classes (the CLI links it from the data)."
            )
        for key in ("head_channels", "head_hidden", "reduction"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise ValueError(
                    f"{key} must be an int >= 1, got {value!r}; change --model.net.{key}."
                )
        check_omega(self.omega, "; change --model.net.omega.")
        check_delta(self.delta, "; change --model.net.delta.")
        if self.head_pool not in HEAD_POOLS:
            raise ValueError(
                f"head_pool must be one of {HEAD_POOLS}, got {self.head_pool!r}; change "
                "--model.net.head_pool."
            )
        if self.conv_layer not in CONV_LAYERS:
            raise ValueError(
                f"conv_layer must be one of {CONV_LAYERS}, got {self.conv_layer!r}; change "
                "--model.net.conv_layer."
            )
        if self.suppress_source not in SUPPRESS_SOURCES:
            raise ValueError(
                f"suppress_source must be one of {SUPPRESS_SOURCES}, got "
                f"{self.suppress_source!r}: 'input' gives CRAM's x_s = S * X (default), "
                "'enhanced' gives x_s = S * (I * X); change --model.net.suppress_source."
            )
        check_suppress_top_k(self.suppress_top_k, "; change --model.net.suppress_top_k.")
        if not isinstance(self.final_features, bool):
            raise ValueError(
                f"final_features must be true or false, got {self.final_features!r}; change "
                "--model.net.final_features."
            )
        size = self.img_size
        sizes = [size] if is_int(size) else size if isinstance(size, list) else []
        if size is not None and not (
            len(sizes) == (1 if is_int(size) else 2) and all(is_int(s) and s >= 1 for s in sizes)
        ):
            raise ValueError(
                f"img_size must be an int >= 1 or [h, w], got {size!r}; change --data.image_size "
                "(the command line links it to --model.net.img_size)."
            )
        if self.head_weights is not None:
            self.head_weights = normalized_head_weights(self.head_weights)
        if self.attention_options is not None and not isinstance(self.attention_options, dict):
            raise ValueError(
                f"attention_options must be a mapping, got {self.attention_options!r}; change "
                "--model.net.attention_options."
            )

    def attention_settings(self) -> dict[str, Any]:
        """The settings an attention module's constructor may take from the network's."""
        return {
            "conv_layer": self.conv_layer,
            "reduction": self.reduction,
            "omega": float(self.omega),
            "delta": float(self.delta),
            "suppress_source": self.suppress_source,
            "suppress_top_k": self.suppress_top_k,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain values that rebuild the architecture (``pretrained`` forced to False)."""
        out = dataclasses.asdict(self)
        out["pretrained"] = False
        out["omega"], out["delta"] = float(self.omega), float(self.delta)
        return out


def validate_hparams(
    backbone: str,
    num_classes: int,
    variant: str = NetConfig.variant,
    pretrained: bool | str | os.PathLike = NetConfig.pretrained,
    **hparams: Any,
) -> dict[str, Any]:
    """Check a model configuration before anything is built.

    The backbone is instantiated on the ``meta`` device (no memory, no weights) to read its
    feature stages and check that it can be split.

    Args:
        backbone: timm model name.
        num_classes: Number of classes K.
        variant: One of :func:`variant_names`.
        pretrained: False, True, or a path to a local weights file (must exist).
        **hparams: The other fields of :class:`NetConfig`.

    Returns:
        The full keyword set for :func:`~crasmra.model.build_network`, defaults filled in
        and ``stage_indices`` resolved to a list.

    Raises:
        ValueError: with a message saying what to change.
        FileNotFoundError: ``pretrained`` is a path that does not exist.
    """
    config = NetConfig.from_kwargs(
        backbone=backbone, num_classes=num_classes, variant=variant, **hparams
    )
    if not isinstance(pretrained, bool):
        if not isinstance(pretrained, str | os.PathLike):
            raise ValueError(f"pretrained must be a bool or a file path, got {pretrained!r}; "
                             "change --model.net.pretrained.")
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"Pretrained weights file not found: {str(pretrained)!r}")
    config.stage_indices = list(
        check_backbone(backbone, config.stage_indices, config.img_size)
    )
    return {**dataclasses.asdict(config), "pretrained": pretrained}
