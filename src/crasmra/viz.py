"""Figures of a trained network: CAM grids, CRAM channel importance, report plots.

For one image, :func:`explain_image` draws a grid with one column per attended stage:

- **Grad-CAM** (pytorch-grad-cam) of the predicted class. For each stage the target is that
  stage's own head logit for the class the combined prediction picked, and the target layer
  is the stage's Conv_layer (its output is the head-side map x_e), as in the paper's Figure 5.
  The plain variant has one column: timm's classifier logit on the last stage's output.
- **Activation map**: the mean over channels of x_e, the paper's Figure 4.
- **SMRAM attention** (optional, ``smram=``): the spatial distribution SMRAM computes from x_e
  in training, with the checkpoint's SMRAM weights.

and a second figure with CRAM's channel importance I per stage, the channels CRAM suppresses
for the next stage marked. Maps are overlaid on the image as the network saw it (after the
eval resize and centre crop).

Figures are drawn with matplotlib's Agg canvas on standalone ``Figure`` objects, so nothing
here touches pyplot's global state or needs a display. grad-cam is an optional dependency
(``pip install "crasmra[viz]"``), imported only when a Grad-CAM is computed.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from crasmra.data import load_image
from crasmra.errors import MissingExtraError
from crasmra.layers import SMRAM, record_channel_importance
from crasmra.model import CRASMRANet

__all__ = [
    "CamResult",
    "activation_maps",
    "channel_importance",
    "explain_image",
    "gradcam_maps",
    "plot_cam_grid",
    "plot_channel_importance",
    "plot_confusion_matrix",
    "plot_reliability",
    "smram_maps",
    "true_label_from_path",
    "unique_names",
]

log = logging.getLogger(__name__)

#: Opacity of a heat map drawn over the image.
OVERLAY_ALPHA = 0.5
#: Width (inches) of one panel of a CAM grid.
PANEL_INCHES = 2.2
DPI = 110


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------
def _to_unit(maps: Tensor) -> Tensor:
    """Min-max scale each (H, W) map of an (N, H, W) tensor to [0, 1] (constant maps -> 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W), bilinear."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def unit_maps(maps: Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    """(N, h, w) maps -> N arrays (H, W), bilinearly upsampled and min-max scaled to [0, 1].

    The one scaling of every map crasmra draws (``crasmra cam``, the web page).
    """
    return list(_to_unit(_upsample(maps, size)).cpu().numpy())


def activation_maps(features: Sequence[Tensor], size: tuple[int, int]) -> list[np.ndarray]:
    """Channel-mean activation map of each stage (the paper's Figure 4), scaled to [0, 1].

    Args:
        features: The head-side maps x_e of one image, each (1, C_a, h, w) or (C_a, h, w).
        size: Output (H, W), normally the input image's.

    Returns:
        One (H, W) array per stage.
    """
    maps = []
    for f in features:
        mean = f.detach().float().reshape(-1, *f.shape[-3:])[0].mean(dim=0)  # (h, w)
        maps.append(unit_maps(mean[None], size)[0])
    return maps


class _StageLogits(nn.Module):
    """Exposes one stage head's logits as the model output, as pytorch-grad-cam expects."""

    def __init__(self, net: CRASMRANet, stage: int) -> None:
        super().__init__()
        self.net = net
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).stage_logits[self.stage]


def _gradcam_classes() -> tuple[Any, Any]:
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as err:
        raise MissingExtraError("Grad-CAM", "viz", "the grad-cam package") from err
    return GradCAM, ClassifierOutputTarget


def gradcam_maps(model: CRASMRANet, image: Tensor, class_index: int) -> list[np.ndarray]:
    """Grad-CAM of ``class_index`` for every attended stage, each scaled to [0, 1].

    Stage ``i``'s map is the Grad-CAM of its own head's logit with the stage's Conv_layer
    (whose output is x_e) as the target layer. The plain variant has one map: the Grad-CAM of
    timm's classifier logit on the last stage's output, which its head reads.

    Args:
        model: The network, in eval mode.
        image: One normalised image, (3, H, W) or (1, 3, H, W).
        class_index: The class to explain (normally the predicted one).

    Returns:
        One (H, W) array per stage.

    Raises:
        ImportError: grad-cam is not installed (with the install command).
    """
    grad_cam, target_cls = _gradcam_classes()
    # An input that requires grad keeps the graph alive even when the caller froze the
    # network's parameters (requires_grad_(False)); enable_grad overrides an outer no_grad.
    x = image.detach().reshape(1, *image.shape[-3:]).clone().requires_grad_(True)
    maps = []
    was_training = model.training
    model.eval()
    try:
        if not model.attention:  # plain: timm's head on the last stage's map
            maps.append(_classifier_gradcam(model, x, int(class_index)))
        for i, attention in enumerate(model.attention):
            # The Conv_layer's output is x_e itself; the attention module returns a tuple,
            # which grad-cam's hooks cannot read.
            target_layer = attention.conv_layer
            with torch.enable_grad(), grad_cam(model=_StageLogits(model, i),
                                               target_layers=[target_layer]) as cam:
                heat = cam(input_tensor=x, targets=[target_cls(int(class_index))])
            maps.append(np.asarray(heat[0], dtype=np.float32))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return maps


def _classifier_gradcam(model: CRASMRANet, x: Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM of the plain variant's classifier logit on the map its head reads, in [0, 1].

    The rule of pytorch-grad-cam's GradCAM, computed directly because the map is the output of
    timm's ``forward_features`` rather than of one module: the spatial mean of the gradient
    weights the map's channels; ReLU, upsample to the input, min-max scale.
    """
    with torch.no_grad():
        (feature,) = model.forward_features(x)  # (1, C, h, w)
    with torch.enable_grad():
        leaf = feature.detach().requires_grad_(True)
        logit = model.forward_heads([leaf]).logits[0][0, class_index]
        (grad,) = torch.autograd.grad(logit, leaf)
    weights = grad[0].mean(dim=(1, 2))  # (C,)
    heat = torch.relu((weights[:, None, None] * leaf[0].detach()).sum(dim=0))  # (h, w)
    return unit_maps(heat[None], (x.shape[-2], x.shape[-1]))[0]


def smram_maps(smram: SMRAM, features: Sequence[Tensor], size: tuple[int, int]) -> list[np.ndarray]:
    """SMRAM's spatial attention of each stage for one image, upsampled and scaled to [0, 1].

    Args:
        smram: SMRAM with trained weights, in eval mode (see ``crasmra.inference.load_smram``).
        features: The head-side maps x_e of one image, each (1, C_a, h, w).
        size: Output (H, W).
    """
    with torch.inference_mode():
        _, attention = smram([f.detach()[:1] for f in features])  # (1, S, h, w)
    return unit_maps(attention[0], size)


def channel_importance(records: Sequence[Tensor | None]) -> list[np.ndarray] | None:
    """The first image's channel importance I, one (C,) array per stage.

    Args:
        records: What :func:`~crasmra.layers.record_channel_importance` recorded.

    Returns:
        None when nothing was recorded (plain / baseline / cbam networks have no CRAM).
    """
    if not records or any(r is None for r in records):
        return None
    return [r[0].float().cpu().numpy() for r in records]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = image.detach().float().reshape(-1, *image.shape[-3:])[0].cpu()
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _wrap(text: str, width: int = 60) -> str:
    # Not at hyphens: "wing-striped" split over two lines reads as two words.
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def plot_cam_grid(
    image: np.ndarray,
    rows: dict[str, Sequence[np.ndarray]],
    stage_names: Sequence[str],
    out_path: str | Path,
    *,
    title: str = "",
    title_color: str = "black",
) -> Path:
    """Draw a grid: column 0 the image, then one column per stage; one row per map type.

    Args:
        image: (H, W, 3) float image in [0, 1].
        rows: ``{row label: one (H, W) map in [0, 1] per stage}``.
        stage_names: Column titles.
        out_path: PNG to write.
        title: Figure title.
        title_color: Colour of the title (e.g. red for a wrong prediction).
    """
    n_rows, n_cols = len(rows), len(stage_names) + 1
    fig = _new_figure(PANEL_INCHES * n_cols, PANEL_INCHES * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (label, maps) in enumerate(rows.items()):
        axes[r][0].imshow(image)
        axes[r][0].set_ylabel(_wrap(label, 22), fontsize=9)
        if r == 0:
            axes[r][0].set_title("input", fontsize=9)
        for c, heat in enumerate(maps, start=1):
            ax = axes[r][c]
            ax.imshow(image)
            ax.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
            if r == 0:
                ax.set_title(stage_names[c - 1], fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10, color=title_color)
    return _save(fig, out_path)


def plot_channel_importance(
    importances: Sequence[np.ndarray],
    stage_names: Sequence[str],
    out_path: str | Path,
    *,
    deltas: Sequence[float],
    omegas: Sequence[float],
    title: str = "",
) -> Path:
    """Plot CRAM's channel importance I per stage, channels sorted by importance.

    Channels that CRAM suppresses for the next stage (``softmax(I)_k >= delta * max softmax(I)``,
    i.e. ``I_k >= max I + ln(delta)``) are drawn in red, with that threshold as a dashed line.
    The last stage's suppressed map feeds nothing, so there the red channels only show where
    the threshold lies.
    """
    n = len(importances)
    fig = _new_figure(3.6 * n, 3.0)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, (ax, imp, name, delta, omega) in enumerate(
        zip(axes, importances, stage_names, deltas, omegas, strict=True)
    ):
        order = np.sort(np.asarray(imp, dtype=np.float64))[::-1]
        threshold = order[0] + math.log(delta)
        suppressed = order >= threshold
        ax.bar(np.arange(len(order)), order, width=1.0,
               color=np.where(suppressed, "tab:red", "tab:blue"))
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_xlabel("channel (sorted by importance)", fontsize=8)
        # The last stage's suppressed map has no consumer: there the mask changes nothing.
        what = f"suppressed (x{omega:g})" if i < n - 1 else "over threshold (last stage)"
        ax.set_title(f"{name}: {int(suppressed.sum())}/{len(order)} {what}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("importance I = sigmoid(a + m)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_reliability(calibration: dict[str, Any], out_path: str | Path, *, title: str = "") -> Path:
    """Reliability diagram (accuracy vs confidence per bin) with the confidence histogram.

    Args:
        calibration: From ``crasmra.inference.expected_calibration_error``.
        out_path: PNG to write.
        title: Prefix of the figure title (the ECE is appended).
    """
    bins = calibration["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["confidence"] is not None else 0.0 for b in bins])
    count = np.array([b["count"] for b in bins])
    filled = count > 0
    fig = _new_figure(4.5, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lower[filled], acc[filled], width=width[filled], align="edge", color="tab:blue",
            edgecolor="white", linewidth=0.5, label="accuracy in the bin")
    # The bin's mean confidence as a line over its bar, not a translucent bar: a gap drawn
    # over the accuracy bar (under-confidence) would show as an unexplained dark overlay.
    top.hlines(conf[filled], lower[filled], lower[filled] + width[filled], color="tab:red",
               linewidth=2, label="mean confidence in the bin")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title + ': ' if title else ''}ECE = {100 * calibration['ece']:.2f}%",
                  fontsize=10)
    bottom.bar(lower, count, width=width, align="edge", color="gray", edgecolor="white",
               linewidth=0.5)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_confusion_matrix(
    confusion: np.ndarray | Sequence[Sequence[int]],
    classes: Sequence[str],
    out_path: str | Path,
    *,
    title: str = "",
    max_labels: int = 40,
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class).

    Class names are written on the axes up to ``max_labels`` classes, indices beyond that.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(classes)
    # Long names are wrapped rather than cut: fine-grained classes often differ only at the
    # end of the name ("... tail-plain" vs "... tail-striped").
    labels = [_wrap(c, 24) if len(c) <= 96 else _wrap(c[:95] + "…", 24) for c in classes]
    label_lines = max((label.count("\n") + 1 for label in labels), default=1)
    side = min(4.0 + 0.28 * k * label_lines, 22.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= max_labels:
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (combined prediction)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


# ---------------------------------------------------------------------------------------------
# one image, end to end
# ---------------------------------------------------------------------------------------------
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
    model: CRASMRANet,
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
        ImportError: grad-cam is not installed.
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
    shown = _denormalize(x, preprocessing.mean, preprocessing.std)
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
