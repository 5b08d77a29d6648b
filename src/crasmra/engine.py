"""Training engine: the LightningModule that owns the network, SMRAM, the loss and the metrics.

This is the one place where model, loss, data and optimiser meet (see ARCHITECTURE.md). The
inference network (:class:`crasmra.model.CRASMRANet`) carries no training-only parameters:
SMRAM lives here, next to the loss, and is dropped from every exported model.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from crasmra._version import __version__
from crasmra.checkpoint import FORMAT_VERSION, read_network_state
from crasmra.cpu import plan_compute
from crasmra.errors import CrasmraError
from crasmra.finetune import (
    COMBINES,
    HEAD_INITS,
    HEAD_PATH_INITS,
    SuppressionWarmup,
    fit_head_weights,
    imprint_classifiers,
    init_head_paths,
)
from crasmra.layers import SMRAM
from crasmra.losses import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    CRASMRALoss,
    trains_with_smram,
)
from crasmra.metrics import accuracy_metrics
from crasmra.model import PLAIN, CRASMRANet, NetConfig, create_model
from crasmra.outputs import ModelOutput

log = logging.getLogger(__name__)

#: The prediction the paper reports: mean of the softmaxes of every head.
COMBINED = "combined"
#: Monitored quantity for model selection. Always a validation metric, never a test metric.
MONITOR = f"val/{COMBINED}_top1"

NonFinitePolicy = Literal["stop", "skip"]


class NonFiniteLossError(CrasmraError, FloatingPointError):
    """Raised when the training loss becomes NaN or infinite and the policy is ``"stop"``.

    The run failed rather than its input, hence exit status 1.
    """

    exit_code = 1

    def one_line(self) -> str:
        return f"training stopped: {super().one_line()}"


#: The largest learning rate accepted. SGD diverges far below it; above it, a typo such as
#: 1e300 would overflow the optimiser's float32 state instead of failing here.
MAX_LR = 100.0


def _check_positive(
    name: str, value: float, *, allow_zero: bool = False, maximum: float | None = None
) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be a finite number {bound}, got {value!r}; change --model.{name}."
        )
    if maximum is not None and value > maximum:
        raise ValueError(
            f"{name} must be at most {maximum:g}, got {value!r}; change --model.{name}."
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not (isinstance(value, int) and value >= minimum):
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r}; change --model.{name}."
        )


class CRASMRAModule(L.LightningModule):
    """CRA-SMRA training wrapper: network + SMRAM + loss + optimiser + metrics.

    Every constructor argument is a ``--model.*`` flag of ``crasmra fit`` and is saved in the
    checkpoint, so a checkpoint rebuilds the network, its eval transform and its class names
    with no other file.

    Args:
        backbone: Any timm CNN with at least three feature stages (e.g. ``resnet50``).
        num_classes: Number of classes. Linked from the data module by the CLI.
        variant: ``"baseline"``, ``"cbam"``, ``"cram"`` or ``"cra-smra"`` (paper's Table 3), or
            ``"plain"``: timm's own classifier fine-tuned with cross-entropy (the reference;
            ``lr_backbone`` for the backbone, ``lr_heads`` for the classifier; the attention,
            head and loss-weight arguments do not apply to it), or the name of a registered
            attention module (:mod:`crasmra.layers.registry`). Only ``"cra-smra"`` trains with
            SMRAM (:func:`crasmra.losses.trains_with_smram`).
        pretrained: ``True`` for timm's ImageNet weights, a local weights file, or ``False``.
        omega: CRAM suppression factor applied to the most important channels (SPEC: 0.5).
        delta: CRAM threshold, relative to the most important channel, for suppression (SPEC: 0.9).
        alpha: Weight of the sum of the stage heads' cross-entropies (SPEC: 2).
        beta: Weight of the concatenated head's cross-entropy (SPEC: 1).
        gamma: Weight of SMRAM's diversity loss; only used by ``"cra-smra"`` (SPEC: 1).
        reduction: CRAM MLP reduction ratio r (16: CBAM's usual value; not stated by the paper).
        head_channels: C_a, the channels every attended stage is projected to.
        head_hidden: Hidden width of each classifier head's MLP.
        head_pool: Global pooling before the heads, ``"max"`` or ``"avg"``.
        conv_layer: CRAM's Conv_layer, ``"light"`` (1x1 conv) or ``"pmg"`` (1x1 then 3x3).
        suppress_source: What CRAM's mask S multiplies to give the next stage's input:
            ``"input"`` (``x_s = S * X``, default) or ``"enhanced"`` (``x_s = S * (I * X)``,
            which also trains CRAM's MLP through the later stages). The paper reads either way.
        stage_indices: Feature stages that get attention and a head (default: the last three).
        attention_options: Further options of the attention module (for registered modules
            with options of their own), e.g. ``{gain: 2.0}``.
        final_features: The last attended stage ends where timm's ``forward_features`` ends
            (EfficientNet: after its final 1x1 convolution to 1280 channels), so that its head
            reads what the pretrained classifier reads. Not part of the paper's recipe (whose
            ResNets it does not change).
        head_weights: Weights of the heads in the combined prediction (stage heads, then
            concat), e.g. ``[0, 0, 1, 0]``; None for the paper's mean of the softmaxes.
            ``combine: fitted`` sets them.

    The network's arguments (``backbone`` to ``attention_options``) take their defaults from
    :class:`~crasmra.model.NetConfig`, which also checks them.
        lr_backbone: Learning rate of the backbone (SPEC: 2e-4).
        lr_attention: Learning rate of CRAM/CBAM including Conv_layer (SPEC: 6e-3).
        lr_heads: Learning rate of the classifier heads (SPEC open point, default 6e-3).
        lr_smram: Learning rate of SMRAM; ``None`` means ``lr_backbone`` (SPEC).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: Use Nesterov momentum.
        warmup_epochs: Linear warm-up length in epochs (may be fractional), then cosine decay.
        freeze_backbone_epochs: Train only the attention modules and the heads, with the
            backbone's weights and BatchNorm statistics left as loaded, for this many epochs
            before fine-tuning everything (linear probing then fine-tuning, Kumar et al., ICLR
            2022): new heads are fitted to the pretrained features before their gradients can
            distort them. Not part of the paper's recipe (0, the default). Under DDP it needs
            ``--trainer.strategy ddp_find_unused_parameters_true`` (frozen parameters get no
            gradient).
        freeze_backbone_bn: Keep the backbone's BatchNorm layers in eval mode for the whole run:
            their running statistics stay as loaded and normalise every batch, while their
            scale and shift still train. Fine-tuning with small batches on a small dataset
            otherwise replaces the pretrained statistics with noisy per-batch ones. Not part of
            the paper's recipe (False, the default).
        min_lr_ratio: Final learning rate of the cosine decay, as a fraction of each group's rate.
        head_init: ``"random"`` (PyTorch's initialisation, the paper's) or ``"imprint"``: before
            the first step, every head's last linear layer becomes the nearest-class-mean
            classifier of its own input features on the training data, after the added
            modules' BatchNorm statistics are set to the data's
            (:func:`crasmra.finetune.imprint_classifiers`). Not part of the paper's recipe.
        head_path_init: ``"random"`` (PyTorch's initialisation, the paper's) or
            ``"identity"``: with ``head_init: imprint``, before imprinting, each stage's
            projection keeps the span of its input's class means and every layer between it
            and the classifier starts as the identity on the training images' features
            (:func:`crasmra.finetune.init_head_paths`), so that the imprinted classifiers read
            what the backbone knows instead of a random projection of it. Needs the light
            Conv_layer; the plain variant (no projection, no head MLP) ignores it. Not part of
            the paper's recipe.
        imprint_logit_scale: With ``"imprint"``, the logits' scale for a feature of average
            norm (the softmax's inverse temperature on the cosine); None (the default) fits
            it per head to the training images' leave-one-out cross-entropy, so that every
            head starts calibrated.
        imprint_centered: With ``"imprint"``, centre each head's features on the mean of its
            class means before the cosine (SimpleShot's CL2N; the default) or not (the plain
            cosine nearest class mean, the anchor of EXPERIMENTS.md).
        combine: How the heads combine into the test-time prediction: ``"mean"`` (the
            paper's mean of the softmaxes, or ``head_weights`` when given) or ``"fitted"``:
            with ``head_init: imprint``, the heads' weights that maximise the likelihood of the
            training images' leave-one-out predictions at imprinting
            (:func:`crasmra.finetune.fit_head_weights`), so that heads whose features
            separate the classes poorly cannot drag the combined prediction below the good
            ones; with a single image per class (nothing to hold out) the last stage's head
            alone. Not part of the paper's recipe.
        suppression_warmup_epochs: CRAM's omega rises linearly from 1 (no suppression) to
            ``omega`` over this many epochs (:class:`crasmra.finetune.SuppressionWarmup`);
            validation, test and checkpoints always use ``omega``. Not part of the paper's
            recipe (0, the default).
        channels_last: Run the network in channels-last memory format. None (the default)
            chooses: on a CPU what :func:`crasmra.cpu.plan_compute` measured fastest for the
            backbone, on a GPU channels-last (what AMP convolutions are fastest in).
        compile: Wrap the network with ``torch.compile``.
        nonfinite_loss: ``"stop"`` raises on a NaN/Inf loss naming the step and the loss terms;
            ``"skip"`` skips that batch's optimiser step and counts it (``train/skipped_batches``,
            logged every epoch). Under DDP the ranks agree, so all of them skip together.
        nonfinite_check_interval: With ``"stop"``, how often (in batches) the loss is checked on
            the host; 1 checks every batch before its update. N > 1 avoids a host-device
            synchronisation per step: a device-side flag remembers the first non-finite loss and
            is read every N batches and always before validation and before any checkpoint is
            written, so a checkpoint never holds weights updated with a non-finite loss.
        classes: Class names in label order (linked from the data module by the CLI).
        transform_config: Plain values that rebuild the eval transform (linked from data).
        init_from: A checkpoint or weights file to initialise the network from (fine-tuning, not
            resuming: optimiser state is not loaded).
        reinit_heads: With ``init_from``, re-initialise the classifier heads, e.g. to fine-tune
            on another number of classes.
    """

    def __init__(
        self,
        backbone: str = NetConfig.backbone,
        num_classes: int = NetConfig.num_classes,
        variant: str = NetConfig.variant,
        pretrained: bool | str = NetConfig.pretrained,
        omega: float = NetConfig.omega,
        delta: float = NetConfig.delta,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        gamma: float = DEFAULT_GAMMA,
        reduction: int = NetConfig.reduction,
        head_channels: int = NetConfig.head_channels,
        head_hidden: int = NetConfig.head_hidden,
        head_pool: str = NetConfig.head_pool,
        conv_layer: str = NetConfig.conv_layer,
        suppress_source: Literal["input", "enhanced"] = NetConfig.suppress_source,
        stage_indices: Sequence[int] | None = NetConfig.stage_indices,
        attention_options: dict[str, Any] | None = NetConfig.attention_options,
        final_features: bool = NetConfig.final_features,
        head_weights: list[float] | None = NetConfig.head_weights,
        lr_backbone: float = 2e-4,
        lr_attention: float = 6e-3,
        lr_heads: float = 6e-3,
        lr_smram: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        nesterov: bool = False,
        warmup_epochs: float = 0.0,
        freeze_backbone_epochs: int = 0,
        freeze_backbone_bn: bool = False,
        min_lr_ratio: float = 0.0,
        head_init: Literal["random", "imprint"] = "random",
        head_path_init: Literal["random", "identity"] = "random",
        imprint_logit_scale: float | None = None,
        imprint_centered: bool = True,
        combine: Literal["mean", "fitted"] = "mean",
        suppression_warmup_epochs: float = 0.0,
        channels_last: bool | None = None,
        compile: bool = False,
        nonfinite_loss: NonFinitePolicy = "stop",
        nonfinite_check_interval: int = 1,
        classes: Sequence[str] | None = None,
        transform_config: dict[str, Any] | None = None,
        init_from: str | None = None,
        reinit_heads: bool = False,
    ) -> None:
        super().__init__()
        # Validate everything that does not need the network before building it, so a typo
        # fails in milliseconds rather than after a backbone is constructed.
        for name, value in (
            ("lr_backbone", lr_backbone),
            ("lr_attention", lr_attention),
            ("lr_heads", lr_heads),
        ):
            _check_positive(name, value, maximum=MAX_LR)
        if lr_smram is not None:
            _check_positive("lr_smram", lr_smram, maximum=MAX_LR)
        if not 0 <= momentum < 1:
            raise ValueError(
                f"momentum must be in [0, 1), got {momentum!r}; change --model.momentum."
            )
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        _check_positive("warmup_epochs", warmup_epochs, allow_zero=True)
        _check_int("freeze_backbone_epochs", freeze_backbone_epochs, minimum=0)
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}; "
                "change --model.min_lr_ratio."
            )
        if head_init not in HEAD_INITS:
            raise ValueError(
                f"head_init must be one of {HEAD_INITS}, got {head_init!r}; change "
                "--model.head_init."
            )
        if head_path_init not in HEAD_PATH_INITS:
            raise ValueError(
                f"head_path_init must be one of {HEAD_PATH_INITS}, got {head_path_init!r}; "
                "change --model.head_path_init."
            )
        if head_path_init == "identity" and head_init != "imprint":
            raise ValueError(
                "--model.head_path_init identity prepares the heads for imprinting; add "
                "--model.head_init imprint, or use --model.head_path_init random."
            )
        if head_path_init == "identity" and variant != PLAIN and conv_layer != "light":
            raise ValueError(
                "--model.head_path_init identity needs the light Conv_layer (1x1 conv, BN, "
                f"ReLU), got --model.conv_layer {conv_layer!r}; use --model.conv_layer light "
                "or --model.head_path_init random."
            )
        if combine not in COMBINES:
            raise ValueError(
                f"combine must be one of {COMBINES}, got {combine!r}; change --model.combine."
            )
        if combine == "fitted" and head_init != "imprint":
            raise ValueError(
                "--model.combine fitted fits the heads' weights when they are imprinted; add "
                "--model.head_init imprint, or use --model.combine mean."
            )
        if imprint_logit_scale is not None:
            _check_positive("imprint_logit_scale", imprint_logit_scale, maximum=1e4)
        _check_positive("suppression_warmup_epochs", suppression_warmup_epochs, allow_zero=True)
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(
                f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}; "
                "change --model.nonfinite_loss."
            )
        _check_int("nonfinite_check_interval", nonfinite_check_interval, minimum=1)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"{len(classes)} class names were given for num_classes={num_classes}; "
                "they must agree (the CLI links both from --data)."
            )
        if reinit_heads and init_from is None:
            raise ValueError("--model.reinit_heads needs --model.init_from PATH to fine-tune from.")
        self.save_hyperparameters()

        self.criterion = CRASMRALoss(alpha=alpha, beta=beta, gamma=gamma)
        arguments = locals()
        self.net: CRASMRANet = create_model(
            **{name: arguments[name] for name in NetConfig.field_names()}
        )
        # SMRAM is a training-time regulariser: it exists only for the variant that uses it and
        # is never part of `self.net`, so saved and exported inference networks do not carry it.
        self.smram: SMRAM | None = (
            SMRAM(head_channels, num_stages=len(self.net.stage_names))
            if trains_with_smram(variant)
            else None
        )
        if init_from is not None:
            self._init_from(init_from, reinit_heads)
        # None is resolved in setup(), once the device is known.
        self._channels_last = False
        if channels_last:
            self._use_channels_last()
        self.classes = list(classes) if classes is not None else None
        self.transform_config = dict(transform_config) if transform_config is not None else None
        self.head_names: tuple[str, ...] = (*self.net.head_names, COMBINED)
        self.val_metrics = self._make_metrics("val/")
        self.test_metrics = self._make_metrics("test/")
        # Counted on the device so that the training step never synchronises with the host.
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long), persistent=False)
        # First non-finite loss since the last host-side check (nonfinite_check_interval > 1):
        # global step, epoch and batch index (-1: none), and the loss terms at that step.
        self.register_buffer(
            "_nonfinite_at", torch.full((3,), -1, dtype=torch.long), persistent=False
        )
        self._nonfinite_terms: Tensor | None = None
        self._nonfinite_names: tuple[str, ...] = ()
        self._batches_since_check = 0
        self._skipped_at_epoch_start = 0
        # freeze_backbone_epochs: whether the backbone is frozen now, and which parameters.
        self._backbone_frozen = False
        self._frozen_params: list[nn.Parameter] = []
        # suppression_warmup_epochs, in optimiser steps once the trainer knows them.
        self._suppression = SuppressionWarmup(float(omega), 0)

    # ------------------------------------------------------------------ construction helpers
    def _make_metrics(self, prefix: str) -> MetricCollection:
        return accuracy_metrics(self.head_names, self.hparams.num_classes, prefix)

    def _init_from(self, path: str, reinit_heads: bool) -> None:
        state, source_classes = read_network_state(path)
        head_keys = self._head_state_keys()
        if reinit_heads:
            state = {k: v for k, v in state.items() if k not in head_keys}
        elif source_classes is not None and source_classes != self.hparams.num_classes:
            raise ValueError(
                f"{path} was trained for {source_classes} classes but the data has "
                f"{self.hparams.num_classes}; add --model.reinit_heads true to fine-tune it with "
                "new classifier heads."
            )
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if reinit_heads:
            missing = [k for k in missing if k not in head_keys]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit this network ({self.hparams.backbone}, "
                f"variant={self.hparams.variant}): {len(missing)} missing keys (first: "
                f"{missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]})."
            )
        log.info("Initialised the network from %s%s", path, " (new heads)" if reinit_heads else "")

    def _head_state_keys(self) -> set[str]:
        """State-dict keys of the classifier heads (parameters and BN buffers)."""
        head_params = {id(p) for p in self.net.parameter_groups()["heads"]}
        head_modules = {
            name
            for name, module in self.net.named_modules()
            if any(id(p) in head_params for p in module.parameters(recurse=False))
        }
        return {key for key in self.net.state_dict() if key.rsplit(".", 1)[0] in head_modules}

    def _use_channels_last(self) -> None:
        self._channels_last = True
        self.net = self.net.to(memory_format=torch.channels_last)

    @property
    def uses_channels_last(self) -> bool:
        """Whether the network runs in channels-last memory format (``channels_last`` resolved)."""
        return self._channels_last

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last is None and not self._channels_last:
            on_cpu = self.trainer.strategy.root_device.type == "cpu"
            if not on_cpu or plan_compute(self.hparams.backbone).channels_last:
                self._use_channels_last()

    def configure_model(self) -> None:
        """Compile the network once the trainer has placed it (``--model.compile true``)."""
        # nn.Module.compile compiles in place, so state-dict keys (and checkpoints) are unchanged.
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    # ------------------------------------------------------------------ forward and losses
    def forward(self, images: Tensor) -> ModelOutput:
        """Run the inference network (no SMRAM)."""
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def compute_loss(self, output: ModelOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The paper's objective: alpha * stage CEs + beta * concat CE + gamma * L_div.

        For ``"plain"``: the cross-entropy of timm's classifier.
        """
        div = None
        if self.smram is not None:
            div, _ = self.smram(list(output.features))
        return self.criterion(output, target, div_loss=div)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, target = batch
        output = self(images)
        total, parts = self.compute_loss(output, target)
        finite = torch.isfinite(total)
        if self.hparams.nonfinite_loss == "skip":
            if self.trainer.world_size > 1 and torch.distributed.is_initialized():
                # Every rank must take the same decision: a rank that skips its backward while
                # the others run theirs would leave DDP's gradient all-reduce waiting forever.
                agreed = finite.to(torch.int32)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
                finite = agreed.bool()
            # Deciding to skip needs the value on the host; this sync happens only under "skip".
            if not bool(finite):
                self.skipped_batches += 1
                log.warning(
                    "Skipping batch %d of step %d: non-finite loss %s",
                    batch_idx,
                    self.global_step,
                    self._describe(parts),
                )
                # In automatic optimisation a None loss means no backward: gradients stay None
                # after Lightning's zero_grad, so the optimiser leaves every parameter untouched.
                return None
        elif self.hparams.nonfinite_check_interval == 1:
            if not bool(finite):
                raise self._nonfinite_error(
                    self.global_step, self.current_epoch, batch_idx, self._describe(parts)
                )
        else:
            self._remember_nonfinite(finite, parts, batch_idx)
            self._batches_since_check += 1
            if self._batches_since_check >= self.hparams.nonfinite_check_interval:
                self.check_nonfinite()
        batch_size = images.shape[0]
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, batch_size=batch_size)
        return total

    @staticmethod
    def _describe(parts: dict[str, Tensor]) -> str:
        return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())

    @staticmethod
    def _nonfinite_error(step: int, epoch: int, batch_idx: int, terms: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"Non-finite training loss at global step {step} (epoch {epoch}, batch {batch_idx}): "
            f"{terms}. The last good checkpoint is kept. Lower the learning rates, use "
            "--trainer.gradient_clip_val, or set --model.nonfinite_loss skip to skip such batches."
        )

    # ------------------------------------------------------------------ non-finite loss checks
    def _remember_nonfinite(self, finite: Tensor, parts: dict[str, Tensor], batch_idx: int) -> None:
        """Record on the device, without a sync, the first non-finite loss since the last check."""
        terms = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
        if self._nonfinite_terms is None or self._nonfinite_terms.shape != terms.shape:
            self._nonfinite_terms = torch.zeros_like(terms)
            self._nonfinite_names = tuple(parts)
        at = self._nonfinite_at
        first = ~finite & (at[0] < 0)
        # masked_fill takes the Python ints as kernel arguments: no host-to-device copy.
        self._nonfinite_at = torch.stack(
            [
                at[0].masked_fill(first, self.global_step),
                at[1].masked_fill(first, self.current_epoch),
                at[2].masked_fill(first, batch_idx),
            ]
        )
        self._nonfinite_terms = torch.where(first, terms, self._nonfinite_terms)

    def check_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was recorded since the last check.

        Only does work with ``nonfinite_loss="stop"`` and ``nonfinite_check_interval > 1``; the
        one host-device synchronisation per call is the point of the interval.
        """
        self._batches_since_check = 0
        if self._nonfinite_terms is None:
            return
        step, epoch, batch_idx = (int(v) for v in self._nonfinite_at.tolist())
        if step < 0:
            return
        terms = ", ".join(
            f"{name}={float(v):.4g}"
            for name, v in zip(self._nonfinite_names, self._nonfinite_terms.tolist(), strict=True)
        )
        raise self._nonfinite_error(step, epoch, batch_idx, terms)

    def on_validation_start(self) -> None:
        # No point validating weights that a non-finite loss has already updated.
        if self.trainer.state.fn == "fit":
            self.check_nonfinite()
        # Validation measures the network that checkpoints record: the configured omega.
        self._suppression.apply(self.net, self._suppression.steps)

    def on_test_start(self) -> None:
        self._suppression.apply(self.net, self._suppression.steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._suppression.steps > 0:
            self._suppression.apply(self.net, self.global_step)

    def on_train_start(self) -> None:
        # A run resumed inside an epoch (step-interval checkpoints) continues it without an
        # epoch-start hook: the freezing and BatchNorm policies must be in force from here.
        self._set_backbone_frozen(self.current_epoch < self.hparams.freeze_backbone_epochs)
        self.train()
        self._suppression.apply(self.net, self.global_step)
        # A resumed run restores imprinted (and trained) weights from its checkpoint.
        if self.hparams.head_init == "imprint" and self.global_step == 0:
            self._imprint_heads()

    def _imprint_heads(self) -> None:
        trainer = self.trainer
        train_loader = trainer.train_dataloader
        # A loader of its own over the training set, in order and in this process: iterating
        # the trainer's loader here would start its (persistent) workers and its sampler's
        # epoch out of turn.
        loader = torch.utils.data.DataLoader(
            train_loader.dataset,
            batch_size=train_loader.batch_size or 1,
            shuffle=False,
            num_workers=0,
            collate_fn=train_loader.collate_fn,
        )

        def batches() -> Any:
            for batch in loader:
                images, target = trainer.strategy.batch_to_device(batch)
                if self._channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield images, target

        # The training transform's random draws must not shift the training run's own.
        # The plain variant has no projection or head MLP: nothing to initialise.
        identity_paths = (
            self.hparams.head_path_init == "identity" and self.hparams.variant != PLAIN
        )
        with torch.random.fork_rng(devices=[]):
            if identity_paths:
                kept = init_head_paths(self.net, batches, self.hparams.num_classes)
                log.info(
                    "Initialised the projections and heads as the identity on the training "
                    "images' features (class-mean directions kept: %s).",
                    ", ".join(f"{name} {count}" for name, count in kept.items()),
                )
            report = imprint_classifiers(
                self.net, batches, self.hparams.num_classes, self.hparams.imprint_logit_scale,
                calibrate=not identity_paths, centered=self.hparams.imprint_centered,
            )
        log.info(
            "Imprinted the heads with the class means of their features (nearest class mean "
            "on the training images, logit scale): %s.",
            report.describe(),
        )
        if self.hparams.combine == "fitted" and len(self.net.head_names) > 1:
            # With a single photo per class nothing can be held out: the head that reads the
            # backbone's last stage then decides alone (with final_features it is the nearest
            # class mean of the pretrained classifier's features).
            last_stage = [0.0] * len(self.net.head_names)
            last_stage[len(self.net.stage_names) - 1] = 1.0
            weights = fit_head_weights(report.loo_probs, report.loo_labels, fallback=last_stage)
            self.net.set_head_weights(weights)
            log.info(
                "Combined prediction: the heads weighted %s (fitted to the leave-one-out "
                "predictions of the training images).",
                ", ".join(
                    f"{n} {w:.2f}" for n, w in zip(self.net.head_names, weights, strict=True)
                ),
            )

    def on_train_epoch_start(self) -> None:
        self._skipped_at_epoch_start = int(self.skipped_batches)
        self._set_backbone_frozen(self.current_epoch < self.hparams.freeze_backbone_epochs)
        # Lightning never calls train() itself (it saves and restores each submodule's mode
        # around validation), so the BatchNorm policy of train() is applied here.
        self.train()

    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone is held as loaded (``freeze_backbone_epochs``) right now."""
        return self._backbone_frozen

    def _set_backbone_frozen(self, frozen: bool) -> None:
        if frozen == self.backbone_frozen:
            return
        if frozen:
            # The backbone learning-rate group: for "plain" it excludes timm's classifier,
            # which sits inside the timm model.
            self._frozen_params = list(self.net.parameter_groups()["backbone"])
        # Parameters without a gradient are skipped by SGD (no update, no weight decay), and
        # autograd then computes no weight gradients for them, which also saves their cost.
        for param in self._frozen_params:
            param.requires_grad_(not frozen)
        self._backbone_frozen = frozen
        if frozen:
            log.info(
                "Epochs 0-%d: backbone frozen, training the attention modules and heads only.",
                self.hparams.freeze_backbone_epochs - 1,
            )
        else:
            log.info("Epoch %d: fine-tuning the whole network.", self.current_epoch)

    def train(self, mode: bool = True) -> CRASMRAModule:
        """Set train/eval mode; the backbone's BatchNorm layers stay in eval mode while the
        backbone is frozen or with ``freeze_backbone_bn``."""
        super().train(mode)
        if mode and (self.backbone_frozen or self.hparams.freeze_backbone_bn):
            for module in self.net.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def on_train_epoch_end(self) -> None:
        self.check_nonfinite()
        if self.hparams.nonfinite_loss == "skip":
            skipped = int(self.skipped_batches) - self._skipped_at_epoch_start
            # The ranks agree on every skip (see training_step), so all log the same count.
            self.log("train/skipped_batches", float(skipped), sync_dist=True)
            if skipped:
                log.warning(
                    "Epoch %d: skipped %d batch(es) with a non-finite loss.",
                    self.current_epoch,
                    skipped,
                )

    def _eval_step(
        self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, prefix: str
    ) -> None:
        images, target = batch
        output = self(images)
        total, _ = self.compute_loss(output, target)
        probs = {
            name: torch.softmax(logits.float(), dim=1)
            for name, logits in zip(self.head_names[:-1], output.logits, strict=True)
        }
        probs[COMBINED] = output.probs.float()
        for name, metric in metrics.items():
            head = name[len(prefix) :].rsplit("_", 1)[0]
            metric.update(probs[head], target)
        self.log(f"{prefix}loss", total, batch_size=images.shape[0], sync_dist=True)
        self.log_dict(metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val/")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test/")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).probs

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """SGD parameter groups with the paper's per-module learning rates."""
        hp = self.hparams
        groups = self.net.parameter_groups()
        lr_smram = hp.lr_smram if hp.lr_smram is not None else hp.lr_backbone
        spec = [
            ("backbone", groups["backbone"], hp.lr_backbone),
            ("attention", groups["attention"], hp.lr_attention),
            ("heads", groups["heads"], hp.lr_heads),
            ("smram", list(self.smram.parameters()) if self.smram is not None else [], lr_smram),
        ]
        return [{"name": n, "params": p, "lr": lr} for n, p, lr in spec if p]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # The fused kernel exists for CUDA; elsewhere the multi-tensor (foreach) path is fastest.
        fused = self.device.type == "cuda"
        optimizer = torch.optim.SGD(
            self.parameter_groups(),
            lr=hp.lr_backbone,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov and hp.momentum > 0,
            fused=fused or None,
            foreach=None if fused else True,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(total_steps - 1, round(hp.warmup_epochs * steps_per_epoch))
        scheduler = build_scheduler(optimizer, total_steps, warmup_steps, hp.min_lr_ratio)
        self._suppression = SuppressionWarmup(
            float(hp.omega), round(hp.suppression_warmup_epochs * steps_per_epoch)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every checkpoint (epoch end, every_n_train_steps, manual) passes here before it is
        # written: weights updated with a non-finite loss must never replace a good checkpoint.
        self.check_nonfinite()
        # Everything inference needs, in plain types, so `torch.load(weights_only=True)` reads it.
        checkpoint["crasmra"] = {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "net_config": self.net.config,
            "classes": self.classes,
            "transform": self.transform_config,
            "data_config": self.net.data_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("crasmra")
        if meta is None:
            raise ValueError("This checkpoint was not written by crasmra (no 'crasmra' entry).")
        saved = meta["net_config"]
        # Fitted head weights live in the network's config, not in its state dict.
        if saved.get("head_weights") is not None and saved.get("num_classes") == (
            self.hparams.num_classes
        ):
            self.net.set_head_weights(saved["head_weights"])
        trainer = self._trainer
        evaluating = trainer is not None and trainer.state.fn in ("validate", "test")
        if saved.get("num_classes") != self.hparams.num_classes and evaluating:
            raise ValueError(
                f"The checkpoint was trained for {saved.get('num_classes')} classes but the data "
                f"has {self.hparams.num_classes}. Evaluate it on the data it was trained on: "
                "pass that run's --config, or no --config and no --data options to use the data "
                "settings stored in the checkpoint."
            )
        if saved.get("num_classes") != self.hparams.num_classes:
            raise ValueError(
                f"The checkpoint was trained for {saved.get('num_classes')} classes but the data "
                f"has {self.hparams.num_classes}. To fine-tune it on this data, start a new run "
                "with --model.init_from CKPT --model.reinit_heads true instead of --ckpt_path."
            )


class WarmupCosine:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_lr_ratio``.

    A plain callable object rather than a lambda, so ``LambdaLR`` saves its settings in the
    checkpoint as plain numbers (readable with ``torch.load(weights_only=True)``).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay with optional linear warm-up; every group keeps its own base rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio)
    )


class RNGStateCallback(L.Callback):
    """Save the Python, NumPy and torch RNG states in checkpoints and restore them on resume.

    Lightning restores model, optimiser, scheduler and AMP-scaler state but not the global RNGs,
    which drive shuffling and augmentation. Restoring them at the start of the first resumed
    training epoch makes a resumed run repeat the uninterrupted one when it stopped between epochs.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": {
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A restart inside an epoch (step-interval checkpoints) continues that epoch without
        # an epoch-start hook: restore now rather than at the next epoch.
        if getattr(trainer.fit_loop, "restarted_mid_epoch", False):
            self._restore()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
        np_state = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
