"""One image, end to end: its prediction, its maps and the figures of ``crasmra cam``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crasmra.data import load_image
from crasmra.layers import SMRAM, record_channel_importance
from crasmra.model import Network
from crasmra.viz.gradcam import gradcam_maps
from crasmra.viz.maps import activation_maps, channel_importance, smram_maps
from crasmra.viz.overlay import denormalize
from crasmra.viz.plots import plot_cam_grid, plot_channel_importance

__all__ = ["CamResult", "explain_image", "true_label_from_path", "unique_names"]

log = logging.getLogger(__name__)


@dataclass
class CamResult:
    """Files written for one image and the prediction shown in them."""

    source: str
    grid: Path
    importance: Path | None
    predicted: str
    probability: float
    true_label: str | None


def true_label_from_path(path: str | Path, classes: Sequence[str]) -> str | None:
    """The image's class when its folder is named after one (``<root>/<class>/<image>``)."""
    parent = Path(path).parent.name
    return parent if parent in classes else None


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """File stems for output names; repeated stems get ``-2``, ``-3``... in input order."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def explain_image(
    model: Network,
    image: str | Path | Image.Image,
    out_dir: str | Path,
    *,
    name: str | None = None,
    true_label: str | None = None,
    smram: SMRAM | None = None,
) -> CamResult:
    """Write ``<name>_cam.png`` (Grad-CAM / activation / SMRAM grid) and ``<name>_importance.png``.

    Args:
        model: A network from ``crasmra.load_model`` (uses ``transform``, ``preprocessing``
            and ``classes``).
        image: An image file or a PIL image.
        out_dir: Output folder (created).
        name: Stem of the output files; default the image file's stem.
        true_label: The true class, shown in the title when given.
        smram: Adds a row of SMRAM's spatial attention (``crasmra cam --train-maps``).

    Returns:
        The files written and the prediction. The importance plot is None for networks without
        CRAM (plain, baseline, cbam).

    Raises:
        crasmra.data.ImageLoadError: The image file cannot be read.
        crasmra.errors.MissingExtraError: pytorch-grad-cam is not installed.
    """
    source = str(image) if not isinstance(image, Image.Image) else (name or "image")
    pil = load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    name = name or (Path(image).stem if not isinstance(image, Image.Image) else "image")
    out = Path(out_dir)
    device = next(model.parameters()).device
    x = model.transform(pil).unsqueeze(0).to(device)
    size = (x.shape[-2], x.shape[-1])

    model.eval()
    with torch.inference_mode(), record_channel_importance(model.attention) as records:
        output = model(x)
    probs = output.probs[0]
    predicted_index = int(probs.argmax())
    predicted = model.classes[predicted_index]
    importance = channel_importance(records)
    rows: dict[str, Sequence[np.ndarray]] = {
        "Grad-CAM (predicted class)": gradcam_maps(model, x, predicted_index),
        "activation (channel mean)": activation_maps(output.features, size),
    }
    if smram is not None:
        rows["SMRAM attention"] = smram_maps(smram, output.features, size)

    title = f"predicted: {predicted} ({100 * float(probs[predicted_index]):.1f}%)"
    color = "black"
    if true_label is not None:
        title += f"\ntrue: {true_label}"
        color = "tab:green" if true_label == predicted else "tab:red"
    preprocessing = model.resolved_preprocessing()
    shown = denormalize(x, preprocessing.mean, preprocessing.std)
    grid = plot_cam_grid(shown, rows, model.stage_names, out / f"{name}_cam.png",
                         title=title, title_color=color)
    importance_path = None
    if importance is not None:
        importance_path = plot_channel_importance(
            importance, model.stage_names, out / f"{name}_importance.png",
            deltas=[m.delta for m in model.attention], omegas=[m.omega for m in model.attention],
            title=f"CRAM channel importance: {name}",
        )
    else:
        log.info("No CRAM in this network (variant %s): no channel-importance plot",
                 model.variant)
    return CamResult(source=source, grid=grid, importance=importance_path, predicted=predicted,
                     probability=float(probs[predicted_index]), true_label=true_label)
