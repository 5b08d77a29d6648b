"""Building a network from its configuration: one builder per variant."""

from __future__ import annotations

import os
from typing import Any

from crasmra.layers import SMRAM
from crasmra.model.base import Network
from crasmra.model.config import PLAIN, NetConfig, validate_hparams
from crasmra.model.crasmra_net import CRASMRANet
from crasmra.model.plain import PlainNet

__all__ = ["build_network", "create_model", "create_smram"]


def build_network(**config: Any) -> Network:
    """The network a configuration describes (a checkpoint's ``net_config``, or
    ``net.config``), without the checks of :func:`create_model`.

    Args:
        **config: The fields of :class:`~crasmra.model.NetConfig`.
    """
    if config.get("variant", NetConfig.variant) == PLAIN:
        return PlainNet(**{k: v for k, v in config.items() if k != "variant"})
    return CRASMRANet(**config)


def create_model(
    backbone: str,
    num_classes: int,
    variant: str = "cra-smra",
    pretrained: bool | str | os.PathLike = False,
    **hparams: Any,
) -> Network:
    """Validate a configuration, then build the network.

    Args:
        backbone: timm CNN name (resnet50, resnet101, densenet161, convnext_*, ...).
        num_classes: Number of classes K.
        variant: One of :func:`~crasmra.model.variant_names`.
        pretrained: False, True (timm ImageNet weights;
            :class:`~crasmra.backbones.PretrainedWeightsError` when they cannot be fetched)
            or a path to a local weights file.
        **hparams: The other fields of :class:`~crasmra.model.NetConfig`.

    Returns:
        The network (:class:`~crasmra.model.CRASMRANet`, or :class:`~crasmra.model.PlainNet`
        for ``"plain"``), in training mode.
    """
    return build_network(**validate_hparams(backbone, num_classes, variant, pretrained, **hparams))


def create_smram(net: Network, loss_form: str = "1-h") -> SMRAM:
    """Build the SMRAM that matches ``net`` (C_a channels, one map per attended stage).

    For the training engine; SMRAM is never part of the network itself.
    """
    return SMRAM(net.head_channels, num_stages=len(net.stage_names), loss_form=loss_form)
