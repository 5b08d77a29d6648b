"""The backbone's freezing and BatchNorm policy (``--model.finetune.freeze_backbone_epochs``,
``--model.finetune.freeze_backbone_bn``)."""

from __future__ import annotations

import logging

from torch import nn

from crasmra.model import Network

__all__ = ["BackbonePolicy"]

log = logging.getLogger(__name__)


class BackbonePolicy:
    """Holds the backbone as loaded for the first epochs, and its BatchNorm layers in eval mode.

    Args:
        freeze_epochs: Epochs during which the backbone's weights get no gradient and its
            BatchNorm statistics stay as loaded.
        freeze_bn: Keep the backbone's BatchNorm layers in eval mode for the whole run.
    """

    def __init__(self, freeze_epochs: int = 0, freeze_bn: bool = False) -> None:
        self.freeze_epochs = freeze_epochs
        self.freeze_bn = freeze_bn
        self.frozen = False
        self._frozen_params: list[nn.Parameter] = []

    def start_epoch(self, net: Network, epoch: int) -> None:
        """Freeze or release the backbone for ``epoch``."""
        frozen = epoch < self.freeze_epochs
        if frozen == self.frozen:
            return
        if frozen:
            # The backbone learning-rate group: for "plain" it excludes timm's classifier,
            # which sits inside the timm model.
            self._frozen_params = list(net.parameter_groups()["backbone"])
        # Parameters without a gradient are skipped by SGD (no update, no weight decay), and
        # autograd then computes no weight gradients for them, which also saves their cost.
        for param in self._frozen_params:
            param.requires_grad_(not frozen)
        self.frozen = frozen
        if frozen:
            log.info("Epochs 0-%d: backbone frozen, training the attention modules and heads "
                     "only.", self.freeze_epochs - 1)
        else:
            log.info("Epoch %d: fine-tuning the whole network.", epoch)

    def apply_modes(self, net: Network) -> None:
        """After ``train()``: put the backbone's BatchNorm layers in eval mode when the
        backbone is frozen or with ``freeze_bn``."""
        if self.frozen or self.freeze_bn:
            for module in net.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
