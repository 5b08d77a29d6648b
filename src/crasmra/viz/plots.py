"""Figures drawn with matplotlib's Agg canvas on standalone ``Figure`` objects, so nothing here
touches pyplot's global state or needs a display."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crasmra.viz.overlay import HeatOverlay

__all__ = [
    "DPI",
    "PANEL_INCHES",
    "plot_cam_grid",
    "plot_channel_importance",
    "plot_confusion_matrix",
    "plot_reliability",
]

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
    overlay = HeatOverlay()
    fig = _new_figure(PANEL_INCHES * n_cols, PANEL_INCHES * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (label, maps) in enumerate(rows.items()):
        axes[r][0].imshow(image)
        axes[r][0].set_ylabel(_wrap(label, 22), fontsize=9)
        if r == 0:
            axes[r][0].set_title("input", fontsize=9)
        for c, heat in enumerate(maps, start=1):
            ax = axes[r][c]
            ax.imshow(overlay.blend(image, heat))
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
