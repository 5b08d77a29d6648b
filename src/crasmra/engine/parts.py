"""The training module's typed parts besides the network's: optimiser, fine-tuning, runtime.

Each part is a dataclass: jsonargparse gives its fields nested flags (``--model.optim.lr_heads``),
and constructing one checks it, with an error that names the flag to change. The network's
part is :class:`crasmra.model.NetConfig`, the loss weights' :class:`crasmra.losses.LossWeights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from crasmra.finetune import (
    COMBINES,
    CRAM_INITS,
    CRAM_SUPPRESSIONS,
    HEAD_INITS,
    HEAD_PATH_DIRECTIONS,
    HEAD_PATH_INITS,
    IMPRINT_TRANSFORMS,
)
from crasmra.model import NetConfig, attention_of

__all__ = [
    "MAX_LR",
    "NONFINITE_POLICIES",
    "FinetuneConfig",
    "NonFinitePolicy",
    "OptimConfig",
    "RuntimeConfig",
    "check_parts",
]

#: The largest learning rate accepted. SGD diverges far below it; above it, a typo such as
#: 1e300 would overflow the optimiser's float32 state instead of failing here.
MAX_LR = 100.0
NonFinitePolicy = Literal["stop", "skip"]
NONFINITE_POLICIES: tuple[str, ...] = ("stop", "skip")


def _number(flag: str, value: object, *, allow_zero: bool = False,
            maximum: float | None = None) -> None:
    name = flag.rsplit(".", 1)[-1]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}; change {flag}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, got {value!r}; change {flag}.")


def _integer(flag: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not (isinstance(value, int) and value >= minimum):
        name = flag.rsplit(".", 1)[-1]
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r}; change {flag}."
        )


def _choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        name = flag.rsplit(".", 1)[-1]
        raise ValueError(f"{name} must be one of {choices}, got {value!r}; change {flag}.")


@dataclass
class OptimConfig:
    """SGD with per-module learning rates and a per-step cosine schedule (``--model.optim.*``).

    Attributes:
        lr_backbone: Learning rate of the backbone (SPEC: 2e-4).
        lr_attention: Learning rate of CRAM/CBAM including Conv_layer (SPEC: 6e-3).
        lr_heads: Learning rate of the classifier heads (SPEC open point, default 6e-3).
        lr_smram: Learning rate of SMRAM; ``None`` means ``lr_backbone`` (SPEC).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: Use Nesterov momentum. Ours, not the paper's (which does not say).
        warmup_epochs: Linear warm-up length in epochs (may be fractional), then cosine
            decay. Ours, not the paper's (0, the default).
        min_lr_ratio: Final learning rate of the cosine decay, as a fraction of each group's
            rate.
    """

    lr_backbone: float = 2e-4
    lr_attention: float = 6e-3
    lr_heads: float = 6e-3
    lr_smram: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-5
    nesterov: bool = False
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lr_backbone", "lr_attention", "lr_heads"):
            _number(f"--model.optim.{name}", getattr(self, name), maximum=MAX_LR)
        if self.lr_smram is not None:
            _number("--model.optim.lr_smram", self.lr_smram, maximum=MAX_LR)
        if not isinstance(self.momentum, int | float) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}; change "
                             "--model.optim.momentum.")
        _number("--model.optim.weight_decay", self.weight_decay, allow_zero=True)
        _number("--model.optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        if not isinstance(self.min_lr_ratio, int | float) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}; "
                             "change --model.optim.min_lr_ratio.")

    def smram_lr(self) -> float:
        """SMRAM's learning rate: ``lr_smram``, else ``lr_backbone``."""
        return self.lr_smram if self.lr_smram is not None else self.lr_backbone


@dataclass
class FinetuneConfig:
    """Fine-tuning policies that keep what a pretrained backbone knows (``--model.finetune.*``).

    None is part of the paper's recipe; every default leaves it out.

    Attributes:
        freeze_backbone_epochs: Train only the attention modules and the heads, with the
            backbone's weights and BatchNorm statistics left as loaded, for this many epochs
            before fine-tuning everything (linear probing then fine-tuning, Kumar et al.,
            ICLR 2022). Under DDP it needs ``--trainer.strategy
            ddp_find_unused_parameters_true`` (frozen parameters get no gradient).
        probe_below: With fewer training images per class than this (the training set's
            size over the class count), only the heads' classifiers train, from their
            imprinted (or probed) start, for the whole run: the backbone, the attention
            modules and the heads' inner layers, BatchNorm statistics included, stay as
            loaded and initialised (a linear probe). 0 (the default): always fine-tune.
        plain_probe_below: ``probe_below`` for the ``plain`` variant, whose classifier reads
            the pretrained features directly and so starts as the full linear probe of them
            (the paper heads' start in the span of their stage's class means, which their
            steps widen); None (the default): ``probe_below``.
        no_steps_below: With fewer training images per class than this, no gradient step
            is taken: the fitted classifiers (``head_init`` ``imprint`` or ``probe``) and
            everything below them are the result (the epochs still run, validating the same
            weights). 0 (the default): every run trains.
        freeze_backbone_bn: Keep the backbone's BatchNorm layers in eval mode for the whole
            run: their running statistics stay as loaded while their scale and shift still
            train. Small batches from a small dataset otherwise replace the pretrained
            statistics with noisy ones.
        head_init: ``"random"`` (PyTorch's initialisation, the paper's), ``"imprint"``:
            before the first step, every head's last linear layer becomes the
            nearest-class-mean classifier of its own input features on the training data
            (:func:`crasmra.finetune.imprint_classifiers`), or ``"probe"``: imprinted, then
            refitted as the bias-free logistic regression of the same features' directions
            (centred, L2-normalised), its weight decay chosen on a hold-out of them
            (:func:`crasmra.finetune.probe.probe_linear`; linear probing, then fine-tuning).
            Everything said below of ``"imprint"`` holds for ``"probe"`` too.
        head_path_init: ``"random"`` or ``"identity"``: with ``head_init: imprint``, each
            stage's projection keeps the span of its input's class means and every layer
            between it and the classifier starts as the identity on the training features
            (:func:`crasmra.finetune.init_head_paths`). Needs the light Conv_layer; the plain
            variant (no projection, no head MLP) ignores it.
        head_path_directions: With ``head_path_init: identity``, what each projection (and a
            non-square hidden layer) keeps: ``"class_means"`` (the default), the span of the
            class means alone, at most K - 1 directions; ``"principal"``, that span, then the
            leading principal directions of the features' variance outside it, up to half the
            layer's width. With few classes the class means leave most of a map out (10
            classes: 9 of 1280 directions of EfficientNet-Lite0's last stage).
        imprint_logit_scale: With ``"imprint"``, the logits' scale for a feature of average
            norm; None fits it per head to the training images' leave-one-out cross-entropy.
        imprint_centered: With ``"imprint"``, centre each head's features on the mean of its
            class means before the cosine (SimpleShot's CL2N; the default) or not. With
            ``head_path_init: identity``, False also makes the projections keep the span of
            the class means themselves (their mean's direction included) instead of the
            centred means', so that each stage head starts as the uncentred cosine nearest
            class mean of its stage's pooled map.
        imprint_signed: With ``head_path_init: identity``, imprint (and probe) each head's
            classifier on the signed differences ``relu(z) - relu(-z) = z`` of the ``(relu(z),
            relu(-z))`` pairs its input starts with, and give it ``[W, -W, 0]``
            (:attr:`crasmra.finetune.HeadPaths.signed_pairs`): the stage heads start as classifiers
            linear in their stage's pooled map, as ``plain``'s is in its pooled features. False
            (the default): every input feature on its own, the pooled ``|z|`` included.
        imprint_transform: With ``"imprint"``, the view of the training images that the
            heads are imprinted (and the head paths initialised) from: ``"train"``, the
            training transform's random crops and flips, or ``"eval"``, the evaluation
            transform's resize and centre crop, the view that validation, test and predict
            see.
        combine: ``"mean"`` (the paper's mean of the softmaxes, or ``net.head_weights``) or
            ``"fitted"``: with ``head_init: imprint``, the heads' weights that maximise the
            likelihood of the training images' leave-one-out predictions
            (:func:`crasmra.finetune.fit_head_weights`).
        cram_init: ``"random"`` (PyTorch's initialisation of CRAM's importance MLP) or
            ``"neutral"``: before the first step its last layer is scaled by 1e-3
            (:func:`crasmra.finetune.neutral_cram_start`), so that every channel starts at
            nearly the same importance and the heads first read the stage's map rescaled
            rather than reweighted at random; ``"auto"``: neutral where CRAM does not train
            (fewer training images per class than ``probe_below``), random elsewhere.
        cram_suppression: ``"always"`` (the paper's): CRAM's mask damps the channels it
            selects by ``omega`` in every run; ``"trained"``: only where CRAM trains. Where
            it does not (fewer training images per class than ``probe_below``), the run sets
            omega to 1 before its first step and records it in the network's config, so that
            checkpoints, tests, predictions and exports keep it: the mask multiplies nothing
            and the later stages read the stage's map as the backbone computes it, instead of
            a channel chosen by CRAM's untrained weights damped in every image.
        suppression_warmup_epochs: CRAM's omega rises linearly from 1 (no suppression) to
            ``omega`` over this many epochs (:class:`crasmra.finetune.SuppressionWarmup`);
            validation, test and checkpoints always use ``omega``.
        wise_alpha: After the last scheduled step, every weight of the network becomes
            ``(1 - wise_alpha) * start + wise_alpha * trained``, the start being the network
            before the first step (WiSE-FT, Wortsman et al., CVPR 2022;
            :func:`crasmra.finetune.mix_weights`). 1 (the default): the trained weights. The
            last epoch's validation, the checkpoints written from then on and the test after
            fit see the mix; a run stopped before its last step (``max_time``, an early stop)
            keeps its trained weights. Until then checkpoints also hold the start, so that a
            resumed run can mix.
        ema_epochs: After the last scheduled step, every weight of the network becomes its
            exponential moving average along the training steps (Polyak averaging, as timm's
            ``ModelEmaV3``; :class:`crasmra.finetune.TrajectoryAverage`), whose time constant is
            this many epochs: the per-step decay is ``exp(-1 / (ema_epochs * steps per
            epoch))``. 0 (the default): the last step's weights. As with ``wise_alpha``, the
            last epoch's validation, the checkpoints written from then on and the test after
            fit see the average, a run stopped before its last step keeps its trained weights,
            and until then checkpoints also hold the average, so that a resumed run continues
            it. With ``wise_alpha`` the average is what is mixed with the start.
    """

    freeze_backbone_epochs: int = 0
    freeze_backbone_bn: bool = False
    probe_below: float = 0.0
    plain_probe_below: float | None = None
    no_steps_below: float = 0.0
    head_init: Literal["random", "imprint", "probe"] = "random"
    head_path_init: Literal["random", "identity"] = "random"
    head_path_directions: Literal["class_means", "principal"] = "class_means"
    imprint_logit_scale: float | None = None
    imprint_centered: bool = True
    imprint_signed: bool = False
    imprint_transform: Literal["train", "eval"] = "train"
    combine: Literal["mean", "fitted"] = "mean"
    cram_init: Literal["random", "neutral", "auto"] = "random"
    cram_suppression: Literal["always", "trained"] = "always"
    suppression_warmup_epochs: float = 0.0
    wise_alpha: float = 1.0
    ema_epochs: float = 0.0

    def __post_init__(self) -> None:
        _integer("--model.finetune.freeze_backbone_epochs", self.freeze_backbone_epochs, 0)
        _number("--model.finetune.probe_below", self.probe_below, allow_zero=True,
                maximum=1e6)
        if self.plain_probe_below is not None:
            _number("--model.finetune.plain_probe_below", self.plain_probe_below,
                    allow_zero=True, maximum=1e6)
        _choice("--model.finetune.head_init", self.head_init, HEAD_INITS)
        _choice("--model.finetune.head_path_init", self.head_path_init, HEAD_PATH_INITS)
        _choice("--model.finetune.head_path_directions", self.head_path_directions,
                HEAD_PATH_DIRECTIONS)
        if self.head_path_directions != "class_means" and self.head_path_init != "identity":
            raise ValueError(
                "--model.finetune.head_path_directions chooses what the identity head paths "
                "keep; add --model.finetune.head_path_init identity, or use "
                "--model.finetune.head_path_directions class_means."
            )
        _choice("--model.finetune.combine", self.combine, COMBINES)
        _choice("--model.finetune.cram_init", self.cram_init, CRAM_INITS)
        _choice("--model.finetune.cram_suppression", self.cram_suppression,
                CRAM_SUPPRESSIONS)
        _choice("--model.finetune.imprint_transform", self.imprint_transform,
                IMPRINT_TRANSFORMS)
        if self.head_path_init == "identity" and not self.imprints:
            raise ValueError(
                "--model.finetune.head_path_init identity prepares the heads for imprinting; "
                "add --model.finetune.head_init imprint, or use "
                "--model.finetune.head_path_init random."
            )
        if not isinstance(self.imprint_signed, bool):
            raise ValueError(f"imprint_signed must be true or false, got "
                             f"{self.imprint_signed!r}; change --model.finetune.imprint_signed.")
        if self.imprint_signed and self.head_path_init != "identity":
            raise ValueError(
                "--model.finetune.imprint_signed fits the classifiers on the (relu(z), "
                "relu(-z)) pairs that head_path_init identity sets up; add "
                "--model.finetune.head_path_init identity, or use "
                "--model.finetune.imprint_signed false."
            )
        _number("--model.finetune.no_steps_below", self.no_steps_below, allow_zero=True,
                maximum=1e6)
        if self.no_steps_below > 0 and not self.imprints:
            raise ValueError(
                "--model.finetune.no_steps_below keeps the classifiers as they start, and "
                "random ones predict at chance; add --model.finetune.head_init probe (or "
                "imprint), or use --model.finetune.no_steps_below 0."
            )
        if self.combine == "fitted" and not self.imprints:
            raise ValueError(
                "--model.finetune.combine fitted fits the heads' weights when they are "
                "imprinted; add --model.finetune.head_init imprint, or use "
                "--model.finetune.combine mean."
            )
        if self.imprint_logit_scale is not None:
            _number("--model.finetune.imprint_logit_scale", self.imprint_logit_scale,
                    maximum=1e4)
        _number("--model.finetune.suppression_warmup_epochs", self.suppression_warmup_epochs,
                allow_zero=True)
        _number("--model.finetune.wise_alpha", self.wise_alpha, allow_zero=True, maximum=1.0)
        _number("--model.finetune.ema_epochs", self.ema_epochs, allow_zero=True, maximum=1e4)

    @property
    def imprints(self) -> bool:
        """Whether the heads are imprinted before the first step (``imprint`` or ``probe``)."""
        return self.head_init in ("imprint", "probe")


@dataclass
class RuntimeConfig:
    """How the run executes, and where its weights start (``--model.runtime.*``).

    Attributes:
        channels_last: Run the network in channels-last memory format. None chooses: on a
            CPU what :func:`crasmra.cpu.plan_compute` measured fastest for the backbone, on a
            GPU channels-last (what AMP convolutions are fastest in).
        compile: Wrap the network with ``torch.compile``.
        nonfinite_loss: ``"stop"`` raises on a NaN/Inf loss naming the step and the loss
            terms; ``"skip"`` skips that batch's optimiser step and counts it
            (``train/skipped_batches``); see :class:`crasmra.engine.NonFiniteGuard`.
        nonfinite_check_interval: With ``"stop"``, how often (in batches) the loss is checked
            on the host; always before validation and before any checkpoint is written.
        init_from: A checkpoint or weights file to initialise the network from (fine-tuning,
            not resuming: optimiser state is not loaded).
        reinit_heads: With ``init_from``, re-initialise the classifier heads, e.g. to
            fine-tune on another number of classes.
    """

    channels_last: bool | None = None
    compile: bool = False
    nonfinite_loss: NonFinitePolicy = "stop"
    nonfinite_check_interval: int = 1
    init_from: str | None = None
    reinit_heads: bool = False

    def __post_init__(self) -> None:
        _choice("--model.runtime.nonfinite_loss", self.nonfinite_loss, NONFINITE_POLICIES)
        _integer("--model.runtime.nonfinite_check_interval", self.nonfinite_check_interval, 1)
        if self.reinit_heads and self.init_from is None:
            raise ValueError("--model.runtime.reinit_heads needs --model.runtime.init_from PATH "
                             "to fine-tune from.")


def check_parts(net: NetConfig, finetune: FinetuneConfig) -> None:
    """The checks that span two parts.

    Raises:
        ValueError: With the flags to change.
    """
    # A variant without attention (plain) has no projection or head MLP: nothing to set.
    if finetune.head_path_init != "identity" or attention_of(net.variant) is None:
        return
    if net.conv_layer != "light":
        raise ValueError(
            "--model.finetune.head_path_init identity needs the light Conv_layer (1x1 conv, "
            f"BN, ReLU), got --model.net.conv_layer {net.conv_layer!r}; use "
            "--model.net.conv_layer light or --model.finetune.head_path_init random."
        )
