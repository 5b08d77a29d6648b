"""The LightningModule that owns the network, SMRAM, the loss and the metrics."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MetricCollection

from crasmra.checkpoint import CheckpointError, build_metadata, check_network_state
from crasmra.cpu import plan_compute
from crasmra.engine.freezing import BackbonePolicy
from crasmra.engine.nonfinite import NonFiniteGuard
from crasmra.engine.parts import FinetuneConfig, OptimConfig, RuntimeConfig, check_parts
from crasmra.engine.schedule import build_scheduler, build_sgd, parameter_groups
from crasmra.engine.starting_weights import (
    apply_checkpoint_metadata,
    init_network_from,
    start_fresh_run,
    training_batches,
)
from crasmra.finetune import (
    SuppressionWarmup,
    TrajectoryAverage,
    ema_decay,
    mix_weights,
    snapshot_state,
)
from crasmra.flag_moves import PARTS, nest_flat_hparams
from crasmra.layers import SMRAM
from crasmra.losses import CRASMRALoss, LossWeights, trains_with_smram
from crasmra.metric_names import COMBINED
from crasmra.metrics import accuracy_metrics
from crasmra.model import NetConfig, Network, create_model, create_smram
from crasmra.outputs import ModelOutput

__all__ = ["CRASMRAModule"]

log = logging.getLogger(__name__)

#: The checkpoint entry that holds the network's starting weights until ``wise_alpha`` mixes.
WISE_START_KEY = "crasmra_wise_start"
#: The checkpoint entries that hold the weights' moving average and its step count until
#: ``ema_epochs`` applies it.
EMA_STATE_KEY, EMA_STEPS_KEY = "crasmra_ema_state", "crasmra_ema_steps"

_Part = TypeVar("_Part")
# Defaults shared by every signature; each module works on its own copy (see _part).
_NET, _LOSS, _OPTIM = NetConfig(), LossWeights(), OptimConfig()
_FINETUNE, _RUNTIME = FinetuneConfig(), RuntimeConfig()


def _part(cls: type[_Part], value: _Part | Mapping[str, Any] | None) -> _Part:
    """A checked copy of a part given as itself, as its fields (a checkpoint's), or None."""
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        return cls(**value)
    return dataclasses.replace(value)


class CRASMRAModule(L.LightningModule):
    """CRA-SMRA training wrapper: network + SMRAM + loss + optimiser + metrics.

    Every part is a group of ``--model.*`` flags of ``crasmra fit`` (``--model.net.omega``,
    ``--model.optim.lr_heads``, ...) and is saved in the checkpoint's hyperparameters, so a
    checkpoint rebuilds the network, its eval transform and its class names with no other
    file. A part may also be given as a mapping of its fields.

    Args:
        net: The network (:class:`~crasmra.model.NetConfig`); its ``num_classes`` is linked
            from the data module by the CLI.
        loss: The loss weights (:class:`~crasmra.losses.LossWeights`).
        optim: Learning rates, SGD and the schedule (:class:`~crasmra.engine.OptimConfig`).
        finetune: Fine-tuning policies (:class:`~crasmra.engine.FinetuneConfig`).
        runtime: Memory format, compilation, the non-finite-loss policy and the starting
            weights (:class:`~crasmra.engine.RuntimeConfig`).
        classes: Class names in label order (linked from the data module by the CLI).
        transform_config: Plain values that rebuild the eval transform (linked from data).
    """

    def __init__(
        self,
        net: NetConfig = _NET,
        loss: LossWeights = _LOSS,
        optim: OptimConfig = _OPTIM,
        finetune: FinetuneConfig = _FINETUNE,
        runtime: RuntimeConfig = _RUNTIME,
        classes: Sequence[str] | None = None,
        transform_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Every check that needs no network runs before it is built, so that a typo fails in
        # milliseconds rather than after a backbone is constructed.
        self.net_config, self.loss_weights = _part(NetConfig, net), _part(LossWeights, loss)
        self.optim, self.finetune = _part(OptimConfig, optim), _part(FinetuneConfig, finetune)
        self.runtime = _part(RuntimeConfig, runtime)
        check_parts(self.net_config, self.finetune)
        num_classes = self.net_config.num_classes
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names were given for num_classes="
                             f"{num_classes}; they must agree (the CLI links both from --data).")
        self.classes = list(classes) if classes is not None else None
        self.transform_config = dict(transform_config) if transform_config is not None else None
        # Plain values only, so that `torch.load(weights_only=True)` reads every checkpoint.
        self.save_hyperparameters({
            "net": dataclasses.asdict(self.net_config),
            "loss": dataclasses.asdict(self.loss_weights),
            "optim": dataclasses.asdict(self.optim),
            "finetune": dataclasses.asdict(self.finetune),
            "runtime": dataclasses.asdict(self.runtime),
            "classes": self.classes,
            "transform_config": self.transform_config,
        })
        self.criterion = CRASMRALoss(**dataclasses.asdict(self.loss_weights))
        self.net: Network = create_model(**dataclasses.asdict(self.net_config))
        # SMRAM is a training-time regulariser: it exists only for the variant that uses it and
        # is never part of `self.net`, so saved and exported inference networks do not carry it.
        self.smram: SMRAM | None = (
            create_smram(self.net) if trains_with_smram(self.net.variant) else None
        )
        if self.runtime.init_from is not None:
            init_network_from(self.net, self.runtime.init_from, self.runtime.reinit_heads)
        self._channels_last = False  # channels_last None is resolved in setup()
        if self.runtime.channels_last:
            self._use_channels_last()
        self.head_names: tuple[str, ...] = (*self.net.head_names, COMBINED)
        self.val_metrics = accuracy_metrics(self.head_names, num_classes, "val/")
        self.test_metrics = accuracy_metrics(self.head_names, num_classes, "test/")
        self.nonfinite = NonFiniteGuard(self.runtime.nonfinite_loss,
                                        self.runtime.nonfinite_check_interval)
        self.backbone_policy = BackbonePolicy.from_config(self.finetune)
        # suppression_warmup_epochs, in optimiser steps once the trainer knows them.
        self._suppression_steps = 0
        # The network before the first step, kept until wise_alpha mixes it in (None: nothing
        # to mix, or mixed already).
        self._wise_start: dict[str, Tensor] | None = None
        # The weights' moving average (ema_epochs), from the first step until the last one
        # applies it; a resumed run's saved average waits in _ema_resume for on_train_start.
        self._ema: TrajectoryAverage | None = None
        self._ema_resume: tuple[dict[str, Tensor], int] | None = None
        self._ema_decay = 0.0
        self._ema_step_seen = 0

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> CRASMRAModule:
        """The module a checkpoint's hyperparameters describe, in either layout (the parts,
        or the flat one of checkpoints written before them); unknown keys are ignored."""
        nested = nest_flat_hparams(hparams)
        return cls(**{name: nested.get(name) for name in PARTS},
                   classes=nested.get("classes"), transform_config=nested.get("transform_config"))

    # ------------------------------------------------------------------ device and memory format
    def _use_channels_last(self) -> None:
        self._channels_last = True
        self.net = self.net.to(memory_format=torch.channels_last)

    @property
    def uses_channels_last(self) -> bool:
        """Whether the network runs in channels-last memory format (``channels_last`` resolved)."""
        return self._channels_last

    def setup(self, stage: str) -> None:
        if self.runtime.channels_last is None and not self._channels_last:
            on_cpu = self.trainer.strategy.root_device.type == "cpu"
            if not on_cpu or plan_compute(self.net_config.backbone).channels_last:
                self._use_channels_last()

    def configure_model(self) -> None:
        """Compile the network once the trainer has placed it (``--model.runtime.compile``)."""
        # nn.Module.compile compiles in place, so state-dict keys (and checkpoints) are unchanged.
        if self.runtime.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    # ------------------------------------------------------------------ forward and losses
    def forward(self, images: Tensor) -> ModelOutput:
        """Run the inference network (no SMRAM)."""
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def compute_loss(self, output: ModelOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The paper's objective: alpha * stage CEs + beta * concat CE + gamma * L_div
        (for ``"plain"``: the cross-entropy of timm's classifier)."""
        div = self.smram(list(output.features))[0] if self.smram is not None else None
        return self.criterion(output, target, div_loss=div)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self.backbone_policy.no_steps:
            # A None loss: no forward, no backward, no optimiser step (see choose_regime).
            return None
        images, target = batch
        total, parts = self.compute_loss(self(images), target)
        world_size = self._trainer.world_size if self._trainer is not None else 1
        if self.nonfinite.after_loss(total, parts, self.global_step, self.current_epoch,
                                     batch_idx, world_size):
            # In automatic optimisation a None loss means no backward: gradients stay None
            # after Lightning's zero_grad, so the optimiser leaves every parameter untouched.
            return None
        batch_size = images.shape[0]
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, batch_size=batch_size)
        return total

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection,
                   prefix: str) -> None:
        images, target = batch
        output = self(images)
        total, _ = self.compute_loss(output, target)
        probs = {name: torch.softmax(logits.float(), dim=1)
                 for name, logits in zip(self.head_names[:-1], output.logits, strict=True)}
        probs[COMBINED] = output.probs.float()
        for name, metric in metrics.items():
            metric.update(probs[name[len(prefix):].rsplit("_", 1)[0]], target)
        self.log(f"{prefix}loss", total, batch_size=images.shape[0], sync_dist=True)
        self.log_dict(metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val/")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test/")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).probs

    # ------------------------------------------------------------------ policies in force
    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone is held as loaded (``freeze_backbone_epochs``) right now."""
        return self.backbone_policy.frozen

    def train(self, mode: bool = True) -> CRASMRAModule:
        """Set train/eval mode; the backbone's BatchNorm layers stay in eval mode while the
        backbone is frozen or with ``freeze_backbone_bn``."""
        super().train(mode)
        if mode:
            self.backbone_policy.apply_modes(self.net)
        return self

    def _apply_policies(self) -> None:
        self.backbone_policy.start_epoch(self.net, self.current_epoch)
        # Lightning never calls train() itself (it saves and restores each submodule's mode
        # around validation), so the BatchNorm policy of train() is applied here.
        self.train()

    def on_train_start(self) -> None:
        # A run resumed inside an epoch (step-interval checkpoints) continues it without an
        # epoch-start hook: the freezing and BatchNorm policies must be in force from here.
        self.backbone_policy.choose_regime(
            self.net, len(self.trainer.train_dataloader.dataset), self.trainer.world_size)
        self._apply_policies()
        self._suppression.apply(self.net, self.global_step)
        # A resumed run restores its starting (and trained) weights from its checkpoint.
        if self.global_step == 0:
            start_fresh_run(
                self.net, self.finetune, not self.backbone_policy.classifiers_only,
                lambda: training_batches(self.trainer, self._channels_last,
                                         self.finetune.imprint_transform))
            if self.finetune.wise_alpha < 1:
                self._wise_start = snapshot_state(self.net)
        elif self.finetune.wise_alpha < 1 and self._wise_start is None:
            log.warning("The checkpoint this run resumes from holds no starting weights: its "
                        "weights will not be mixed with them (wise_alpha %g).",
                        self.finetune.wise_alpha)
        self._start_average()

    def _start_average(self) -> None:
        """Begin (or, resumed, continue) the weights' moving average (``ema_epochs``)."""
        self._ema_step_seen = self.global_step
        if self.finetune.ema_epochs == 0:
            return
        self._ema = TrajectoryAverage(self.net, self._ema_decay)
        if self._ema_resume is not None:
            self._ema.load(*self._ema_resume)
            self._ema_resume = None
        elif self.global_step > 0:
            log.warning("The checkpoint this run resumes from holds no moving average of its "
                        "weights: the average starts at step %d (ema_epochs %g).",
                        self.global_step, self.finetune.ema_epochs)
        log.info("Averaging the weights along the steps: decay %.4f per step (ema_epochs %g).",
                 self._ema.decay, self.finetune.ema_epochs)

    @property
    def _suppression(self) -> SuppressionWarmup:
        """CRAM's suppression schedule. It ends at the network's omega, not the configured
        one: ``cram_suppression trained`` sets it per run and a checkpoint restores it."""
        return SuppressionWarmup(float(self.net.config["omega"]), self._suppression_steps)

    def on_train_epoch_start(self) -> None:
        self.nonfinite.epoch_start()
        self._apply_policies()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._suppression_steps > 0:
            self._suppression.apply(self.net, self.global_step)

    def _after_last_step(self, batch_idx: int) -> bool:
        trainer = self.trainer
        if trainer.max_steps is not None and 0 < trainer.max_steps <= self.global_step:
            return True
        max_epochs = trainer.max_epochs
        last_epoch = max_epochs is not None and 0 < max_epochs <= self.current_epoch + 1
        return last_epoch and batch_idx + 1 >= trainer.num_training_batches

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        ema = self._ema
        # A batch whose loss was None (no_steps_below, a skipped non-finite loss) took no
        # step: there is nothing new to average.
        if ema is not None and self.global_step > self._ema_step_seen:
            ema.update(self.net)
        self._ema_step_seen = self.global_step
        # Lightning validates and checkpoints the last epoch after this hook, so both see
        # the average and the mix, as the test after fit does.
        last_step = self._after_last_step(batch_idx)
        if ema is not None and last_step:
            self.nonfinite.check()
            if ema.steps > 0:
                ema.copy_to(self.net)
                log.info("The weights are now their moving average over %d steps "
                         "(ema_epochs %g).", ema.steps, self.finetune.ema_epochs)
            self._ema = None
        if self._wise_start is not None and last_step:
            self.nonfinite.check()
            mix_weights(self.net, self._wise_start, self.finetune.wise_alpha)
            self._wise_start = None
            log.info("Mixed the trained weights with the starting ones: %g * trained + %g * "
                     "start (wise_alpha).", self.finetune.wise_alpha,
                     1 - self.finetune.wise_alpha)

    def on_train_end(self) -> None:
        if self._ema is not None:
            log.warning("Training stopped before its last scheduled step: the weights are the "
                        "trained ones, not their moving average (ema_epochs %g).",
                        self.finetune.ema_epochs)
            self._ema = None
        if self._wise_start is not None:
            log.warning("Training stopped before its last scheduled step: the weights are the "
                        "trained ones, not mixed with the start (wise_alpha %g).",
                        self.finetune.wise_alpha)
            self._wise_start = None

    def on_train_epoch_end(self) -> None:
        self.nonfinite.check()
        if self.runtime.nonfinite_loss == "skip":
            # The ranks agree on every skip (see NonFiniteGuard), so all log the same count.
            skipped = self.nonfinite.skipped_this_epoch()
            self.log("train/skipped_batches", float(skipped), sync_dist=True)
            if skipped:
                log.warning("Epoch %d: skipped %d batch(es) with a non-finite loss.",
                            self.current_epoch, skipped)

    def on_validation_start(self) -> None:
        # No point validating weights that a non-finite loss has already updated.
        if self.trainer.state.fn == "fit":
            self.nonfinite.check()
        # Validation measures the network that checkpoints record: the configured omega.
        self._suppression.apply(self.net, self._suppression_steps)

    def on_test_start(self) -> None:
        self._suppression.apply(self.net, self._suppression_steps)

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """SGD parameter groups with the paper's per-module learning rates."""
        return parameter_groups(self.net, self.smram, self.optim)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_sgd(self.parameter_groups(), self.optim, self.device)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(total_steps - 1, round(self.optim.warmup_epochs * steps_per_epoch))
        scheduler = build_scheduler(optimizer, total_steps, warmup_steps, self.optim.min_lr_ratio)
        self._suppression_steps = round(self.finetune.suppression_warmup_epochs * steps_per_epoch)
        if self.finetune.ema_epochs > 0:
            self._ema_decay = ema_decay(self.finetune.ema_epochs, steps_per_epoch)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every checkpoint (epoch end, every_n_train_steps, manual) passes here before it is
        # written: weights updated with a non-finite loss must never replace a good checkpoint.
        self.nonfinite.check()
        # Everything inference needs, in plain types, so `torch.load(weights_only=True)` reads it.
        checkpoint["crasmra"] = build_metadata(self.net.config, self.classes,
                                               self.transform_config, self.net.data_config)
        if self._wise_start is not None:
            checkpoint[WISE_START_KEY] = self._wise_start
        if self._ema is not None:
            checkpoint[EMA_STATE_KEY] = self._ema.state_dict()
            checkpoint[EMA_STEPS_KEY] = self._ema.steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        evaluating = trainer is not None and trainer.state.fn in ("validate", "test")
        apply_checkpoint_metadata(self.net, checkpoint.get("crasmra"), evaluating)
        if not evaluating and WISE_START_KEY in checkpoint:
            # Checked now, not when the last step mixes it: a damaged start must stop the run
            # before it trains.
            check_network_state(self.net, checkpoint[WISE_START_KEY],
                                f"the starting weights ({WISE_START_KEY}) of the checkpoint")
            self._wise_start = checkpoint[WISE_START_KEY]
        if not evaluating and EMA_STATE_KEY in checkpoint:
            check_network_state(self.net, checkpoint[EMA_STATE_KEY],
                                f"the weights' moving average ({EMA_STATE_KEY}) of the checkpoint")
            steps = checkpoint.get(EMA_STEPS_KEY)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise CheckpointError(
                    f"the checkpoint's {EMA_STEPS_KEY} is {steps!r}, not a step count; the file "
                    "was altered. Resume from a checkpoint as `crasmra fit` wrote it.")
            self._ema_resume = (checkpoint[EMA_STATE_KEY], steps)
