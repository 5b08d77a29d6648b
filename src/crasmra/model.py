"""The CRA-SMRA network: staged timm backbone + per-stage attention + stage and concat heads.

The four variants of the paper's ablation (Table 3) differ only in the module after each
attended stage:

- ``"baseline"``: :class:`~crasmra.layers.IdentityAttention` (projection only).
- ``"cbam"``: :class:`~crasmra.layers.CBAMAttention` (timm's CBAM in CRAM's place).
- ``"cram"``: :class:`~crasmra.layers.CRAM`, trained without SMRAM.
- ``"cra-smra"``: :class:`~crasmra.layers.CRAM`, trained with SMRAM's diversity loss.

A fifth variant is the reference every fine-grained paper compares against:

- ``"plain"``: the timm model with its own head, fine-tuned as timm fine-tunes it
  (``forward_features`` then ``forward_head``: global pooling and the classifier on the last
  stage, reset to K classes), trained with plain cross-entropy. No attention, no stage heads,
  no SMRAM; its one head is named ``"classifier"`` (:data:`PLAIN_HEAD`), and the combined
  prediction is that head's softmax. The attention and head hyperparameters are accepted and
  ignored, so one sweep file can list it beside the paper's variants.

Any further attention module registered with
:func:`~crasmra.layers.registry.register_attention` is a variant under its own name.

SMRAM is not part of :class:`CRASMRANet`: it is a training-only device, so it lives with the
loss in the training engine (see :func:`create_smram`), and a network saved or exported for
inference carries no SMRAM weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from crasmra.backbones import (
    PretrainedWeightsError,
    StagedBackbone,
    check_backbone,
)
from crasmra.data.transforms import Preprocessing
from crasmra.layers import (
    CONV_LAYERS,
    DEFAULT_DELTA,
    DEFAULT_OMEGA,
    DEFAULT_REDUCTION,
    HEAD_POOLS,
    SMRAM,
    SUPPRESS_SOURCES,
    ClassifierHead,
    attention_names,
    create_attention,
)
from crasmra.outputs import PLAIN_HEAD, ModelOutput

__all__ = [
    "DEFAULT_HPARAMS",
    "PAPER_VARIANTS",
    "PLAIN",
    "PLAIN_HEAD",
    "VARIANTS",
    "CRASMRANet",
    "ModelOutput",
    "NetConfig",
    "PretrainedWeightsError",
    "attention_of",
    "create_model",
    "create_smram",
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


def variant_names() -> tuple[str, ...]:
    """Every variant a network can be built as: :data:`VARIANTS`, then further registered
    attention modules under their own names (``identity`` is ``baseline``, ``cram`` a paper
    variant)."""
    named = set(PAPER_VARIANTS_ATTENTION.values()) | set(VARIANTS)
    return (*VARIANTS, *(n for n in attention_names() if n not in named))


def attention_of(variant: str) -> str | None:
    """The registered attention module of ``variant`` (None for ``"plain"``)."""
    if variant == PLAIN:
        return None
    return PAPER_VARIANTS_ATTENTION.get(variant, variant)


def _is_int(value: Any) -> bool:
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
            "change --model.head_weights."
        )
    total = sum(values)
    return [w / total for w in values]


@dataclass
class NetConfig:
    """Every hyperparameter of :class:`CRASMRANet`, its default and its check, in one place.

    The training engine's ``--model.*`` options take their defaults from here, and a
    checkpoint's ``net_config`` is :meth:`as_dict` of it. Constructing one validates it.

    Attributes:
        backbone: timm CNN name with at least three feature stages.
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
        attention_options: Further keyword options of the attention module, for modules
            registered with options of their own (see :mod:`crasmra.layers.registry`).
        final_features: The last attended stage runs on to where timm's ``forward_features``
            ends, so that its head reads the features the pretrained classifier reads
            (EfficientNet: 1280 channels after its final 1x1 convolution, instead of the last
            block's 320); no change for ResNets. Ours, for backbones whose last feature stage
            is not their final feature map.
        head_weights: Weights of the heads (stage heads, then concat; plain: its one head)
            in the combined prediction, non-negative, normalised to sum 1; None for the
            paper's mean of the softmaxes. Set by ``--model.combine fitted``
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
    attention_options: dict[str, Any] | None = None
    final_features: bool = False
    head_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.stage_indices is not None:
            self.stage_indices = list(self.stage_indices)
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
                f"Unknown variant {self.variant!r}; choose one of {variants} (--model.variant)."
            )
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}.")
        for key in ("head_channels", "head_hidden", "reduction"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}; change --model.{key}.")
        omega, delta = self.omega, self.delta
        if not isinstance(omega, Real) or isinstance(omega, bool) or not 0.0 <= omega <= 1.0:
            raise ValueError(
                f"omega must be a number in [0, 1] (paper: 0.5), got {omega!r}; change "
                "--model.omega."
            )
        if not isinstance(delta, Real) or isinstance(delta, bool) or not 0.0 < delta <= 1.0:
            raise ValueError(
                f"delta must be a number in (0, 1] (paper: 0.9), got {delta!r}; change "
                "--model.delta."
            )
        if self.head_pool not in HEAD_POOLS:
            raise ValueError(
                f"head_pool must be one of {HEAD_POOLS}, got {self.head_pool!r}; change "
                "--model.head_pool."
            )
        if self.conv_layer not in CONV_LAYERS:
            raise ValueError(
                f"conv_layer must be one of {CONV_LAYERS}, got {self.conv_layer!r}; change "
                "--model.conv_layer."
            )
        if self.suppress_source not in SUPPRESS_SOURCES:
            raise ValueError(
                f"suppress_source must be one of {SUPPRESS_SOURCES}, got "
                f"{self.suppress_source!r}: 'input' gives CRAM's x_s = S * X (default), "
                "'enhanced' gives x_s = S * (I * X)."
            )
        if not isinstance(self.final_features, bool):
            raise ValueError(
                f"final_features must be true or false, got {self.final_features!r}; change "
                "--model.final_features."
            )
        if self.head_weights is not None:
            self.head_weights = normalized_head_weights(self.head_weights)
        if self.attention_options is not None and not isinstance(self.attention_options, dict):
            raise ValueError(
                f"attention_options must be a mapping, got {self.attention_options!r}."
            )

    def attention_settings(self) -> dict[str, Any]:
        """The settings an attention module's constructor may take from the network's."""
        return {
            "conv_layer": self.conv_layer,
            "reduction": self.reduction,
            "omega": float(self.omega),
            "delta": float(self.delta),
            "suppress_source": self.suppress_source,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain values that rebuild the architecture (``pretrained`` forced to False)."""
        out = dataclasses.asdict(self)
        out["pretrained"] = False
        out["omega"], out["delta"] = float(self.omega), float(self.delta)
        return out


#: The keyword hyperparameters of :class:`CRASMRANet` and their defaults, read off
#: :class:`NetConfig`.
DEFAULT_HPARAMS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(NetConfig)
    if f.name not in ("backbone", "num_classes", "variant", "pretrained")
}


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
        The full keyword set for ``CRASMRANet``, defaults filled in and ``stage_indices``
        resolved to a list.

    Raises:
        ValueError: with a message saying what to change.
        FileNotFoundError: ``pretrained`` is a path that does not exist.
    """
    config = NetConfig.from_kwargs(
        backbone=backbone, num_classes=num_classes, variant=variant, **hparams
    )
    if not isinstance(pretrained, bool):
        if not isinstance(pretrained, str | os.PathLike):
            raise ValueError(f"pretrained must be a bool or a file path, got {pretrained!r}.")
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"Pretrained weights file not found: {str(pretrained)!r}")
    config.stage_indices = list(check_backbone(backbone, config.stage_indices))
    return {**dataclasses.asdict(config), "pretrained": pretrained}


class CRASMRANet(nn.Module):
    """Backbone + per-stage attention + one head per stage + a concat head.

    Args:
        backbone: timm CNN name with at least three feature stages.
        num_classes: Number of classes K.
        variant: One of :func:`variant_names`; which attention module follows each attended
            stage (see :data:`PAPER_VARIANTS_ATTENTION`).
        pretrained: False (random init), True (timm ImageNet weights by name) or a path to a
            local timm-format backbone state dict.
        **hparams: The other fields of :class:`NetConfig` (``stage_indices``,
            ``head_channels``, ``head_hidden``, ``head_pool``, ``conv_layer``, ``reduction``,
            ``omega``, ``delta``, ``suppress_source``, ``attention_options``), documented
            there with their defaults.

    Attributes:
        config: JSON-serialisable constructor arguments (``pretrained`` forced to False), so
            ``CRASMRANet(**net.config)`` rebuilds the architecture.
        variant: The variant name.
        num_classes: K.
        head_channels: C_a.
        stage_names: e.g. ``("stage3", "stage4", "stage5")``.
        data_config: timm's preprocessing config for the backbone (mean, std, input_size,
            crop_pct, interpolation). The paper trains at 448 px; input_size is timm's.
        backbone: The :class:`~crasmra.backbones.StagedBackbone` (for ``"plain"`` the whole
            timm model, head included).
        classes: Class names in label order; set for a loaded model
            (:func:`crasmra.inference.load_model`), else None.
        preprocessing: The :class:`~crasmra.data.Preprocessing` its images need; set for a
            loaded model, else None.
        transform: ``preprocessing``'s eval transform; set for a loaded model, else None.
        checkpoint_path: The file a loaded model came from, else None.
        attention: One attention module per attended stage (empty for ``"plain"``).
        heads: One :class:`~crasmra.layers.ClassifierHead` per attended stage (empty for
            ``"plain"``).
        concat_head: Head on the concatenated pooled stage features (n * C_a); None for
            ``"plain"``, whose classifier is timm's (``backbone.model.get_classifier()``).

    The ``"plain"`` variant ignores ``stage_indices`` and the attention and head
    hyperparameters (they are still validated and recorded in ``config``).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        variant: str = NetConfig.variant,
        pretrained: bool | str | os.PathLike = NetConfig.pretrained,
        **hparams: Any,
    ) -> None:
        super().__init__()
        cfg = NetConfig.from_kwargs(
            backbone=backbone, num_classes=num_classes, variant=variant, **hparams
        )
        plain = variant == PLAIN
        self.backbone = StagedBackbone(
            backbone,
            pretrained=pretrained,
            stage_indices=cfg.stage_indices,
            # "plain" keeps timm's own head, its classifier reset to K classes.
            num_classes=num_classes if plain else None,
            final_features=bool(cfg.final_features),
        )
        self.variant = variant
        self.num_classes = num_classes
        self.head_channels = cfg.head_channels
        self.stage_names: tuple[str, ...] = (
            (f"stage{self.backbone.num_feature_stages}",) if plain else self.backbone.stage_names
        )
        self.data_config: dict[str, Any] = dict(self.backbone.data_config)
        attended = () if plain else self.backbone.stage_channels
        self.attention = nn.ModuleList(
            create_attention(
                attention_of(variant), c, cfg.head_channels, cfg.attention_settings(),
                cfg.attention_options,
            )
            for c in attended
        )
        self._head_kwargs = {"hidden": cfg.head_hidden, "pool": cfg.head_pool}
        self.heads, self.concat_head = self._build_heads(num_classes)
        cfg.stage_indices = list(self.backbone.stage_indices)
        self.config: dict[str, Any] = cfg.as_dict()
        self.head_weights: tuple[float, ...] | None = None
        if cfg.head_weights is not None:
            self.set_head_weights(cfg.head_weights)
        # What inference needs besides the weights; plain attributes (not submodules or
        # buffers), so state_dict() and exports are unchanged.
        self.classes: list[str] | None = None
        self.preprocessing: Preprocessing | None = None
        self.transform: Callable | None = None
        self.checkpoint_path: str | None = None

    def resolved_preprocessing(self) -> Preprocessing:
        """:attr:`preprocessing`, or for a network not loaded from a checkpoint the backbone's
        own (timm's ``data_config``: its input size, mean and std)."""
        if self.preprocessing is not None:
            return self.preprocessing
        config = self.data_config
        return Preprocessing.from_config({
            "image_size": list(config.get("input_size", (3, 448, 448)))[1:],
            **{k: config[k] for k in ("mean", "std") if k in config},
        })

    def set_inference_info(
        self,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        checkpoint_path: str | None = None,
    ) -> None:
        """Record the class names and the preprocessing of a trained network."""
        if len(classes) != self.num_classes:
            raise ValueError(
                f"{len(classes)} class names for a network of {self.num_classes} classes."
            )
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.transform = preprocessing.transform()
        self.checkpoint_path = checkpoint_path

    def set_head_weights(self, weights: Sequence[float] | None) -> None:
        """Weight the heads in the combined prediction (None: the paper's equal weights).

        Args:
            weights: One non-negative weight per head of :attr:`head_names`; normalised to
                sum 1 and recorded in :attr:`config`, so checkpoints and exports keep them.
        """
        if weights is None:
            self.head_weights = None
            self.config["head_weights"] = None
            return
        if len(weights) != len(self.head_names):
            raise ValueError(
                f"head_weights needs one weight per head {self.head_names}, got {len(weights)}."
            )
        normalized = normalized_head_weights(weights)
        self.head_weights = tuple(normalized)
        self.config["head_weights"] = normalized

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the heads, in the order of ``ModelOutput.logits``.

        ``(*stage_names, "concat")`` for the paper's variants, ``("classifier",)`` for plain.
        """
        if self.variant == PLAIN:
            return (PLAIN_HEAD,)
        return (*self.stage_names, "concat")

    def _build_heads(self, num_classes: int) -> tuple[nn.ModuleList, ClassifierHead | None]:
        if self.variant == PLAIN:
            return nn.ModuleList(), None
        n, c_a = len(self.stage_names), self.head_channels
        heads = nn.ModuleList(
            ClassifierHead(c_a, num_classes, **self._head_kwargs) for _ in range(n)
        )
        return heads, ClassifierHead(n * c_a, num_classes, **self._head_kwargs)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace every head (stage and concat, or plain's classifier) with a fresh one for K."""
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}.")
        # Weights fitted to the old heads say nothing of the new ones.
        self.set_head_weights(None)
        if self.variant == PLAIN:
            self.backbone.reset_classifier(num_classes)
            self.num_classes = num_classes
            self.config["num_classes"] = num_classes
            return
        ref = next(self.concat_head.parameters())
        heads, concat_head = self._build_heads(num_classes)
        self.heads = heads.to(device=ref.device, dtype=ref.dtype)
        self.concat_head = concat_head.to(device=ref.device, dtype=ref.dtype)
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group (SPEC recipe).

        Returns:
            ``{"backbone": ..., "attention": ... (CRAM/CBAM incl. Conv_layer), "heads": ...
            (stage heads + concat head)}``; every trainable parameter is in exactly one group.
            For ``"plain"``: ``"heads"`` is timm's classifier, ``"backbone"`` everything else,
            ``"attention"`` is empty.
        """

        def trainable(*modules: nn.Module) -> list[nn.Parameter]:
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        if self.variant == PLAIN:
            classifier = {id(p) for p in self.backbone.classifier_parameters()}
            backbone = trainable(self.backbone)
            return {
                "backbone": [p for p in backbone if id(p) not in classifier],
                "attention": [],
                "heads": [p for p in backbone if id(p) in classifier],
            }
        return {
            "backbone": trainable(self.backbone),
            "attention": trainable(self.attention),
            "heads": trainable(self.heads, self.concat_head),
        }

    def forward_features(self, x: Tensor) -> tuple[Tensor, ...]:
        """Run backbone and attention; return the head-side maps x_e, one per stage.

        For ``"plain"``: the one map timm's ``forward_features`` returns.
        """
        if self.variant == PLAIN:
            return (self.backbone.forward_features(x),)
        features = []
        for i, attention in enumerate(self.attention):
            x = self.backbone.forward_segment(i, x)
            x_e, x = attention(x)  # x becomes x_s, the next segment's input
            features.append(x_e)
        return tuple(features)

    def forward(self, x: Tensor) -> ModelOutput:
        """Classify (B, 3, H, W) images; the same computation in train and eval mode."""
        return self.forward_heads(self.forward_features(x))

    def forward_heads(self, features: Sequence[Tensor]) -> ModelOutput:
        """Classify the maps :meth:`forward_features` returned (e.g. detached, for Grad-CAM)."""
        features = tuple(features)
        if self.variant == PLAIN:
            return ModelOutput(
                stage_logits=(),
                concat_logits=None,
                features=features,
                stage_names=self.stage_names,
                classifier_logits=self.backbone.forward_head(features[0]),
                head_weights=self.head_weights,
            )
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


def create_model(
    backbone: str,
    num_classes: int,
    variant: str = "cra-smra",
    pretrained: bool | str | os.PathLike = False,
    **hparams: Any,
) -> CRASMRANet:
    """Validate a configuration, then build the network.

    Args:
        backbone: timm CNN name (resnet50, resnet101, densenet161, convnext_*, ...).
        num_classes: Number of classes K.
        variant: One of :data:`VARIANTS`.
        pretrained: False, True (timm ImageNet weights; :class:`PretrainedWeightsError` when
            they cannot be fetched) or a path to a local weights file.
        **hparams: Keyword hyperparameters of :class:`CRASMRANet`.

    Returns:
        The network, in training mode.
    """
    kwargs = validate_hparams(backbone, num_classes, variant, pretrained, **hparams)
    return CRASMRANet(**kwargs)


def create_smram(net: CRASMRANet, loss_form: str = "1-h") -> SMRAM:
    """Build the SMRAM that matches ``net`` (C_a channels, one map per attended stage).

    For the training engine; SMRAM is never part of the network itself.
    """
    return SMRAM(net.head_channels, num_stages=len(net.stage_names), loss_form=loss_form)
