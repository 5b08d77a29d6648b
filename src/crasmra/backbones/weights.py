"""Backbone names and weights: timm's registry, timm's downloads and local weights files."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from crasmra.errors import CrasmraError

__all__ = [
    "PretrainedArg",
    "PretrainedWeightsError",
    "check_backbone_name",
    "create_timm_model",
    "load_weights_file",
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


def create_timm_model(name: str, pretrained: PretrainedArg, **options: Any) -> nn.Module:
    """``timm.create_model(name, **options)``, with timm's weights when ``pretrained is True``.

    A path in ``pretrained`` is not read here (see :meth:`StagedBackbone.load_weights`).

    Raises:
        PretrainedWeightsError: timm's weights could not be fetched (offline, not cached).
    """
    if pretrained is True:
        try:
            model = timm.create_model(name, pretrained=True, **options)
        except Exception as err:  # any download/cache failure surfaces as one clear error
            raise PretrainedWeightsError(_offline_hint(name)) from err
        # A bare name takes timm's default tag, which differs between architectures (e.g.
        # resnet50.a1_in1k, a timm training recipe, but densenet161.tv_in1k); name the weights.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        logger.info(
            "Backbone weights: timm's %s.%s", cfg.get("architecture", name), cfg.get("tag")
        )
        return model
    return timm.create_model(name, pretrained=False, **options)


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

