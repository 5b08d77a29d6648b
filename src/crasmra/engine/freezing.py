"""The backbone's freezing and BatchNorm policy (``--model.finetune.freeze_backbone_epochs``,
``--model.finetune.freeze_backbone_bn``, ``--model.finetune.probe_below``)."""

from __future__ import annotations

import logging
import warnings

from torch import nn

from crasmra.engine.parts import FinetuneConfig
from crasmra.model import Network

__all__ = ["BackbonePolicy"]

log = logging.getLogger(__name__)


class BackbonePolicy:
    """Holds the backbone as loaded for the first epochs, and its BatchNorm layers in eval mode.

    Args:
        freeze_epochs: Epochs during which the backbone's weights get no gradient and its
            BatchNorm statistics stay as loaded.
        freeze_bn: Keep the backbone's BatchNorm layers in eval mode for the whole run.
        probe_below: With fewer training images per class than this (see
            :meth:`choose_regime`), only the heads' classifiers train for the whole run.
        plain_probe_below: ``probe_below`` for the ``plain`` variant; None: ``probe_below``.
        no_steps_below: With fewer training images per class than this, nothing trains
            (:attr:`no_steps`).
    """

    def __init__(self, freeze_epochs: int = 0, freeze_bn: bool = False,
                 probe_below: float = 0.0, no_steps_below: float = 0.0,
                 plain_probe_below: float | None = None) -> None:
        self.freeze_epochs = freeze_epochs
        self.freeze_bn = freeze_bn
        self.probe_below = probe_below
        self.plain_probe_below = plain_probe_below
        self.no_steps_below = no_steps_below
        self.classifiers_only = False
        self.no_steps = False
        self.frozen = False
        self._frozen_params: list[nn.Parameter] = []

    @classmethod
    def from_config(cls, finetune: FinetuneConfig) -> BackbonePolicy:
        """The policy of the fine-tuning part (``--model.finetune.*``)."""
        return cls(finetune.freeze_backbone_epochs, finetune.freeze_backbone_bn,
                   finetune.probe_below, finetune.no_steps_below, finetune.plain_probe_below)

    def choose_regime(self, net: Network, train_images: int, world_size: int = 1) -> None:
        """Take no step when the training set has fewer than ``no_steps_below`` images per
        class (its size over the network's class count), train only the classifiers below
        ``probe_below`` (``plain_probe_below`` for ``plain``, if set), else fine-tune.

        With one or two photos per class a linear classifier on the pretrained features is
        what generalises; every step on the layers below it fits those few photos at the
        cost of the rest, and with one photo per class so do the classifiers' own steps
        after their probe's fit (EXPERIMENTS.md, "Few photos per class"). ``plain`` starts
        as the full linear probe of the pretrained features, which its steps on the
        backbone lose with more photos than the paper heads' (EXPERIMENTS.md, "plain's
        backbone steps with ten photos per class").

        Raises:
            ValueError: No step is to be taken on more than one device (``world_size``).
        """
        per_class = train_images / max(1, net.num_classes)
        flag, probe_below = "probe_below", self.probe_below
        if net.variant == "plain" and self.plain_probe_below is not None:
            flag, probe_below = "plain_probe_below", self.plain_probe_below
        self.no_steps = per_class < self.no_steps_below
        self.classifiers_only = self.no_steps or per_class < probe_below
        if self.no_steps:
            if world_size > 1:
                raise ValueError(
                    "Below --model.finetune.no_steps_below no step is taken, which "
                    "Lightning allows on one device only; run it with --trainer.devices 1."
                )
            # Every training_step returns None on purpose (CRASMRAModule.training_step).
            warnings.filterwarnings("ignore", message="`training_step` returned `None`")
            log.info("%.1f training images per class (fewer than "
                     "--model.finetune.no_steps_below %g): the heads' fitted classifiers are "
                     "the result; no gradient step is taken.", per_class, self.no_steps_below)
        elif self.classifiers_only:
            log.info("%.1f training images per class (fewer than --model.finetune.%s %g): "
                     "only the classifiers train; the backbone, the attention modules and "
                     "the heads' inner layers stay as initialised.", per_class, flag,
                     probe_below)

    def start_epoch(self, net: Network, epoch: int) -> None:
        """Freeze or release the backbone for ``epoch``."""
        frozen = self.classifiers_only or epoch < self.freeze_epochs
        if frozen == self.frozen:
            return
        if self.classifiers_only:
            classifiers = {id(p) for layer in net.classifier_layers().values()
                           for p in layer.parameters()}
            self._frozen_params = [p for p in net.parameters()
                                   if p.requires_grad and id(p) not in classifiers]
        elif frozen:
            # The backbone learning-rate group: for "plain" it excludes timm's classifier,
            # which sits inside the timm model.
            self._frozen_params = list(net.parameter_groups()["backbone"])
        # Parameters without a gradient are skipped by SGD (no update, no weight decay), and
        # autograd then computes no weight gradients for them, which also saves their cost.
        for param in self._frozen_params:
            param.requires_grad_(not frozen)
        self.frozen = frozen
        if self.classifiers_only:
            return
        if frozen:
            log.info("Epochs 0-%d: backbone frozen, training the attention modules and heads "
                     "only.", self.freeze_epochs - 1)
        else:
            log.info("Epoch %d: fine-tuning the whole network.", epoch)

    def apply_modes(self, net: Network) -> None:
        """After ``train()``: put the backbone's BatchNorm layers in eval mode when the
        backbone is frozen or with ``freeze_bn``, and every BatchNorm layer of the network
        when only the classifiers train."""
        if self.frozen or self.freeze_bn:
            scope = net if self.classifiers_only else net.backbone
            for module in scope.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
