"""Figures of a trained network: CAM grids, CRAM channel importance, report plots.

For one image, :func:`explain_image` draws a grid with one column per attended stage:

- **Grad-CAM** of the predicted class (pytorch-grad-cam, :mod:`~crasmra.viz.gradcam`). For
  each stage the target is that stage's own head logit for the class the combined prediction
  picked, and the explained map is the stage's x_e (the output of its Conv_layer), as in the
  paper's Figure 5. The plain variant has one column: timm's classifier logit on the last
  stage's output. pytorch-grad-cam is the optional ``viz`` extra
  (``pip install "crasmra[viz]"``).
- **Activation map**: the mean over channels of x_e, the paper's Figure 4.
- **SMRAM attention** (optional, ``smram=``): the spatial distribution SMRAM computes from x_e
  in training, with the checkpoint's SMRAM weights.

and a second figure with CRAM's channel importance I per stage, the channels CRAM suppresses
for the next stage marked. Maps are overlaid on the image as the network saw it (after the
eval resize and centre crop), by the overlay :class:`HeatOverlay` that ``crasmra serve`` uses
too.

The parts: :mod:`~crasmra.viz.maps` (maps scaled to [0, 1]), :mod:`~crasmra.viz.gradcam`,
:mod:`~crasmra.viz.overlay`, :mod:`~crasmra.viz.plots` (matplotlib figures) and
:mod:`~crasmra.viz.explain` (one image, end to end).
"""

from __future__ import annotations

from crasmra.viz.explain import CamResult, explain_image, true_label_from_path, unique_names
from crasmra.viz.gradcam import StageGradCAMs, gradcam_maps, stage_gradcams
from crasmra.viz.maps import activation_maps, channel_importance, smram_maps, unit_maps
from crasmra.viz.overlay import OVERLAY_ALPHA, HeatOverlay, denormalize
from crasmra.viz.plots import (
    plot_cam_grid,
    plot_channel_importance,
    plot_confusion_matrix,
    plot_reliability,
)

__all__ = [
    "OVERLAY_ALPHA",
    "CamResult",
    "HeatOverlay",
    "StageGradCAMs",
    "activation_maps",
    "channel_importance",
    "denormalize",
    "explain_image",
    "gradcam_maps",
    "plot_cam_grid",
    "plot_channel_importance",
    "plot_confusion_matrix",
    "plot_reliability",
    "smram_maps",
    "stage_gradcams",
    "true_label_from_path",
    "unique_names",
    "unit_maps",
]
