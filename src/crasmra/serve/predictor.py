"""The model behind the API: prediction, Grad-CAM, overlays and example images."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from crasmra.data import create_dataset
from crasmra.inference import run_dataset_config
from crasmra.model import Network
from crasmra.serve.images import (
    decode_image,
    release_memory,
)
from crasmra.serve.limits import (
    DEFAULT_MAX_PIXELS,
    EXAMPLE_MAX_SIDE,
    JPEG_QUALITY,
    MAX_EXAMPLES,
    TOP_K,
    TRIM_MIN_PIXELS,
)
from crasmra.viz import HeatOverlay, activation_maps, denormalize, stage_gradcams

__all__ = [
    "Example",
    "Explanation",
    "Predictor",
    "explain_tensor",
    "load_examples",
]

log = logging.getLogger("crasmra.serve")

# ---------------------------------------------------------------------------------------------
# the model side
# ---------------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """Prediction and maps of one image.

    Attributes:
        probs: (K,) combined class probabilities (mean of every head's softmax).
        class_index: The predicted class, whose Grad-CAMs are drawn.
        gradcam: One (H, W) map in [0, 1] per attended stage.
        activation: One (H, W) channel-mean activation map in [0, 1] per attended stage.
    """

    probs: Tensor
    class_index: int
    gradcam: list[np.ndarray]
    activation: list[np.ndarray]


def explain_tensor(model: Network, x: Tensor) -> Explanation:
    """Predict one image and compute every stage's Grad-CAM and activation map, from one
    backbone pass (:func:`crasmra.viz.stage_gradcams`).

    Args:
        model: The network, in eval mode (not thread-safe: callers serialise access).
        x: One normalised image, (1, 3, H, W).

    Returns:
        The prediction and the maps, at the input's size.

    Raises:
        crasmra.errors.MissingExtraError: pytorch-grad-cam (the ``viz`` extra) is not installed.
    """
    cams = stage_gradcams(model, x)
    return Explanation(probs=cams.probs.cpu(), class_index=cams.class_index, gradcam=cams.maps,
                       activation=activation_maps(cams.features, (x.shape[-2], x.shape[-1])))


class _Renderer:
    """Overlays as JPEG data URLs, drawn by :class:`crasmra.viz.HeatOverlay` as ``crasmra cam``
    draws them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = mean
        self.std = std
        self.heat = HeatOverlay()

    def image(self, x: Tensor) -> np.ndarray:
        """(1, 3, H, W) normalised tensor -> (H, W, 3) float image in [0, 1]."""
        return denormalize(x, self.mean, self.std)

    def overlay(self, image: np.ndarray, heat: np.ndarray) -> np.ndarray:
        """Blend a [0, 1] map's colours over ``image`` (both (H, W[, 3]))."""
        return self.heat.blend(image, heat)

    @staticmethod
    def data_url(arr: np.ndarray) -> str:
        """A (H, W, 3) float image in [0, 1] as a JPEG data URL."""
        buffer = io.BytesIO()
        # JPEG: overlays are photographs under a smooth colour map, where PNG is about ten
        # times larger (a 448 px answer would weigh megabytes) and slower to encode.
        Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=JPEG_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Predictor:
    """The model behind the API: one image in, a JSON-ready answer out.

    Thread-safe: the network runs under a lock (Grad-CAM's graph and CRAM's recorded
    importance live on the shared module), while decoding and drawing, which touch only the
    request's own data, run outside it.
    """

    def __init__(self, model: Network, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model = model.eval()
        self.max_pixels = int(max_pixels)
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()
        self.preprocessing = model.resolved_preprocessing()
        self.renderer = _Renderer(self.preprocessing.mean, self.preprocessing.std)

    def warm_up(self) -> None:
        """Run one blank image through the network, so the first user does not wait for
        PyTorch's lazy initialisation (about twice a normal request on a CPU)."""
        h, w = self.preprocessing.image_size
        with self._lock:
            explain_tensor(self.model, torch.zeros(1, 3, h, w, device=self.device))

    def info(self) -> dict[str, Any]:
        """Model description for ``/api/info``."""
        size = list(self.preprocessing.image_size)
        return {
            "classes": list(self.model.classes),
            "num_classes": self.model.num_classes,
            "backbone": self.model.config["backbone"],
            "variant": self.model.variant,
            "stage_names": list(self.model.stage_names),
            "image_size": size,
            # The file name only: the page has no use for the server's folder layout.
            "checkpoint": Path(getattr(self.model, "checkpoint_path", "") or "model").name,
            "top_k": min(TOP_K, self.model.num_classes),
        }

    def predict_bytes(self, data: bytes) -> dict[str, Any]:
        """Decode, predict and draw one uploaded image (see the module docstring's JSON).

        Callers bound how many run at once (the app: ``max_concurrent``): each holds a whole
        decoded image while it decodes.
        """
        start = time.perf_counter()
        pixels = None  # None: the decode failed, perhaps after allocating every pixel
        try:
            image = decode_image(data, self.max_pixels)
            try:
                pixels = image.width * image.height
                image_size = [image.width, image.height]
                x = self.model.transform(image).unsqueeze(0).to(self.device)
            finally:
                # The full-size pixels are most of a request's memory: gone before the model.
                image.close()
                del image
            return self._explain(x, image_size, start)
        finally:
            if pixels is None or pixels >= TRIM_MIN_PIXELS:
                release_memory()

    def _explain(self, x: Tensor, image_size: list[int], start: float) -> dict[str, Any]:
        with self._lock:
            result = explain_tensor(self.model, x)
        k = min(TOP_K, self.model.num_classes)
        top = torch.topk(result.probs, k)
        shown = self.renderer.image(x)
        url = self.renderer.data_url
        stages = [
            {"name": name, "gradcam": url(self.renderer.overlay(shown, cam)),
             "activation": url(self.renderer.overlay(shown, act))}
            for name, cam, act in zip(self.model.stage_names, result.gradcam, result.activation,
                                      strict=True)
        ]
        return {
            "top_k": [
                {"rank": r + 1, "index": int(i), "label": self.model.classes[int(i)],
                 "probability": float(p)}
                for r, (p, i) in enumerate(zip(top.values, top.indices, strict=True))
            ],
            "input": url(shown),
            "stages": stages,
            "image_size": image_size,
            "elapsed_ms": round(1000 * (time.perf_counter() - start), 1),
        }


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """An example image, PNG-encoded once at start-up."""

    label: str
    png: bytes


def _keep_pil(image: Image.Image) -> Image.Image:
    return image


def load_examples(checkpoint: str | Path, limit: int = MAX_EXAMPLES) -> list[Example]:
    """One test-split image per class (the first ``limit`` classes) of the checkpoint's dataset.

    The dataset comes from the checkpoint or its run folder's ``config.yaml`` (see
    :func:`crasmra.inference.run_dataset_config`). Returns an empty list when it is not
    recorded or its files are not on this machine; the page then offers no examples.
    """
    data = run_dataset_config(checkpoint)
    if not data or "dataset" not in data:
        log.info("%s records no dataset: the page offers no example images", checkpoint)
        return []
    kwargs = {k: data[k] for k in ("val_fraction", "split_seed") if k in data}
    try:
        dataset = create_dataset(data["dataset"], data.get("root"), "test", transform=_keep_pil,
                                 **kwargs, **dict(data.get("options") or {}))
    except (OSError, ValueError) as err:
        log.info("No example images: the %s dataset cannot be read here (%s)",
                 data["dataset"], str(err).splitlines()[0])
        return []
    first: dict[int, int] = {}
    for index, label in enumerate(getattr(dataset, "targets", [])):
        first.setdefault(int(label), index)
        if len(first) >= limit:
            break
    examples = []
    for label in sorted(first):
        try:
            image, _ = dataset[first[label]]
        except (OSError, ValueError) as err:
            log.info("Skipping an example image: %s", err)
            continue
        image = image.convert("RGB")
        image.thumbnail((EXAMPLE_MAX_SIDE, EXAMPLE_MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        examples.append(Example(label=dataset.classes[label], png=buffer.getvalue()))
    return examples


