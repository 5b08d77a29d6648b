"""The layout of a crasmra checkpoint: format version, key prefixes, limits, metadata entry."""

from __future__ import annotations

from typing import Any

from crasmra.errors import CrasmraError

__all__ = [
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "MAX_HEAD_WIDTH",
    "MAX_IMAGE_SIDE",
    "MAX_ZIP_EXPANSION",
    "NET_PREFIX",
    "SMRAM_PREFIX",
    "ZIP_SLACK_BYTES",
    "CheckpointError",
    "build_metadata",
    "network_hparams",
]

#: Layout version of a crasmra checkpoint. Bumped on incompatible changes. 1: the training
#: module's ``hyper_parameters`` are flat (one key per former ``--model.*`` flag); 2: they are
#: its parts (``net``, ``loss``, ``optim``, ``finetune``, ``runtime``). Both are read: see
#: :func:`network_hparams` and :func:`crasmra.flag_moves.nest_flat_hparams`.
FORMAT_VERSION = 2
#: Prefix of the inference network's keys inside a training checkpoint's state dict.
NET_PREFIX = "net."
#: Prefix of SMRAM's (training-only) keys inside a training checkpoint's state dict.
SMRAM_PREFIX = "smram."
#: Limits on the numbers a checkpoint's metadata may hold. Far above any real model (the paper
#: uses 512-wide heads, 448 px crops and at most 200 classes), they stop a damaged or hostile
#: file from making crasmra allocate terabytes before anything else could notice.
MAX_CLASSES = 100_000
MAX_HEAD_WIDTH = 16_384
MAX_IMAGE_SIDE = 4_096
#: The uncompressed size a torch zip archive may declare: torch stores its entries
#: uncompressed, so a real checkpoint declares about its own size. More means a zip bomb.
MAX_ZIP_EXPANSION = 2
ZIP_SLACK_BYTES = 16 * 2**20


class CheckpointError(CrasmraError, ValueError):
    """A checkpoint or weights file that cannot be used, with the reason and the remedy."""


def build_metadata(
    net_config: dict[str, Any],
    classes: list[str] | None,
    transform: dict[str, Any] | None,
    data_config: dict[str, Any],
) -> dict[str, Any]:
    """The ``"crasmra"`` entry describing a network, in plain JSON-ready types.

    Args:
        net_config: ``CRASMRANet.config`` (rebuilds the architecture).
        classes: Class names in label order.
        transform: Keyword arguments of ``build_transforms(train=False, ...)``.
        data_config: The backbone's timm preprocessing config.
    """
    return {
        "format_version": FORMAT_VERSION,
        "version": _package_version(),
        "net_config": dict(net_config),
        "classes": list(classes) if classes is not None else None,
        "transform": dict(transform) if transform is not None else None,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }


def _package_version() -> str:
    from crasmra._version import __version__

    return __version__


def network_hparams(hparams: Any) -> dict[str, Any]:
    """The network's hyperparameters among a checkpoint's ``hyper_parameters``, in either
    layout (``{}`` when there are none)."""
    if not isinstance(hparams, dict):
        return {}
    net = hparams.get("net")
    return net if isinstance(net, dict) else hparams
