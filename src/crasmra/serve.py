"""A local web page to try a checkpoint: upload an image, see the top-5 and where each stage looks.

``crasmra serve CKPT`` runs :func:`create_app` with uvicorn. The page (``crasmra/static/``, no
external assets, so it works offline) talks to a small JSON API:

- ``GET /api/info``: class names, model description and the server's limits.
- ``POST /api/predict``: a multipart form with one ``image`` file ->
  ``{"top_k": [{"rank", "index", "label", "probability"}], "input": JPEG data URL of the
  image as the network saw it, "stages": [{"name", "gradcam", "activation"}] (JPEG data URLs
  of the overlays), "image_size": [w, h], "elapsed_ms"}``. Errors are ``{"error": message}``
  with a 4xx status (413: too large, 415: not an image, 422: a broken image), or 503 with
  ``Retry-After`` when the server is busy.
- ``GET /api/examples`` and ``GET /api/examples/{i}``: a few test-split images of the
  dataset the checkpoint was trained on, when that dataset can be found (the synthetic set
  is always regenerated).

Safety: the CLI binds to loopback unless told otherwise, and then only answers requests whose
``Host`` is a loopback name (a web page elsewhere cannot reach it through DNS rebinding); a
``Host`` that is not ``host[:port]`` is refused in any case. Request bodies are limited in size
while they stream in, before anything is parsed, and in time (408 when one stalls); the pixel
count is read from the image header before decoding; errors never carry a traceback, and a
client that leaves mid-upload costs one INFO line. Requests share nothing but the read-only
model and examples, and the model is used by one request at a time.

Memory: a decoded image is most of a request's memory. At its peak an RGB image takes about
8 bytes per pixel (PIL stores 4, and the orientation step copies them), one with alpha 24, a
32-bit one 40 (:meth:`ImageHeader.decode_bytes`). So decoding and the model run in
``max_concurrent`` turns, each worth an RGB image at ``max_pixels`` plus a file at the size
limit; an upload takes as many turns as its header says it needs (more than there are: 413),
at most ``max_queue`` more uploads wait (their files spooled to disk past 1 MiB), and any
further one is refused with 503 before its body is read. Whatever arrives, the server thus
stays within its idle footprint plus ``max_concurrent * (8 * max_pixels + max_upload)`` bytes
and 1 MiB per waiting upload: 0.69 GB with the defaults. After a large image the C heap is
trimmed, so that the freed pixels go back to the system.

Grad-CAM is computed here in one pass rather than with :func:`crasmra.viz.gradcam_maps` (one
forward and one full backward pass per stage): see :func:`explain_tensor`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import io
import ipaddress
import logging
import math
import re
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from crasmra.data import ImageLoadError, create_dataset, load_image
from crasmra.errors import MissingExtraError
from crasmra.inference import load_model, run_dataset_config
from crasmra.model import CRASMRANet
from crasmra.viz import OVERLAY_ALPHA, activation_maps, unit_maps

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise MissingExtraError(
        "crasmra serve", "serve", "FastAPI, uvicorn and python-multipart"
    ) from _err

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_UPLOAD_MB",
    "DEFAULT_PORT",
    "Example",
    "Explanation",
    "Guard",
    "ImageHeader",
    "Predictor",
    "RequestError",
    "ServerThread",
    "bind_socket",
    "create_app",
    "decode_image",
    "explain_tensor",
    "is_loopback",
    "load_examples",
    "read_header",
    "release_memory",
    "run_server",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000
#: Turns of decoding and inference; each pays for an RGB image at --max-pixels.
DEFAULT_MAX_CONCURRENT = 2
#: Uploads waiting for a turn; past that, 503.
DEFAULT_MAX_QUEUE = 8
#: Seconds a request's body may take to arrive, from its headers (20 MiB in 60 s: 2.8 Mbit/s).
DEFAULT_BODY_TIMEOUT = 60.0
#: Images of at least this many pixels trim the C heap when done (see release_memory).
TRIM_MIN_PIXELS = 2_000_000
#: Peak bytes per pixel of decoding an RGB image (see ImageHeader.decode_bytes): a turn of
#: --max-concurrent is this times --max-pixels, plus the file.
RGB_DECODE_BYTES_PER_PIXEL = 8
_DECODE_BYTES_PER_PIXEL = {"1": 8, "L": 8, "P": 8, "RGB": 8, "CMYK": 14, "YCbCr": 14, "LAB": 14,
                           "HSV": 14, "I;16": 28, "I;16L": 28, "I;16B": 28, "I;16N": 28}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_MOST_BYTES_PER_PIXEL = 40
_FORMAT_EXTRA_BYTES_PER_PIXEL = {"WEBP": 8, "JPEG2000": 12}
TOP_K = 5
MAX_EXAMPLES = 6
#: Longest side of an example image as served (they are shown as thumbnails, then uploaded).
EXAMPLE_MAX_SIDE = 1024
#: Room for the multipart boundaries and part headers around an upload of the maximum size.
MULTIPART_SLACK = 64 * 1024
#: Quality of the JPEG data URLs of the input and the overlays.
JPEG_QUALITY = 90
#: Host names accepted when the server listens on loopback only.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: ``host[:port]`` of a Host header (after lower-casing): a DNS-style name or IPv4 address, or
#: a bracketed IPv6 address; nothing else (no userinfo ``user@``, path, spaces or commas).
_HOST_HEADER = re.compile(
    r"(?:(?P<name>[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\.?)"
    r"|\[(?P<ipv6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]{0,5}))?")
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page has no inline script or style and loads nothing from elsewhere, so the policy can
# forbid both; overlays arrive as data: URLs, examples as same-origin images.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class RequestError(Exception):
    """A problem with a request, answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


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


def explain_tensor(model: CRASMRANet, x: Tensor) -> Explanation:
    """Predict one image and compute every stage's Grad-CAM and activation map in one pass.

    Grad-CAM of stage ``i`` (as in :func:`crasmra.viz.gradcam_maps`): the gradient of stage
    ``i``'s head logit for the predicted class w.r.t. that stage's x_e (the Conv_layer's
    output), averaged over space, weights x_e's channels; ReLU, upsample, scale to [0, 1].

    The backbone runs once without a graph; only the heads run with autograd, from x_e
    detached. x_e of stage ``i`` feeds only head ``i`` and the concat head, so one backward
    pass of the sum of the stage logits through the heads yields each stage's own gradient,
    where pytorch-grad-cam would run a forward and a full backward pass per stage.

    The plain variant has one map, the last stage's output that timm's head reads; its
    Grad-CAM is that of timm's classifier logit.

    Args:
        model: The network, in eval mode (not thread-safe: callers serialise access).
        x: One normalised image, (1, 3, H, W).

    Returns:
        The prediction and the maps, at the input's size.
    """
    size = (x.shape[-2], x.shape[-1])
    with torch.no_grad():
        features = model.forward_features(x)
    with torch.enable_grad():
        leaves = [f.detach().requires_grad_(True) for f in features]
        output = model.forward_heads(leaves)
        probs = output.probs[0].detach()
        class_index = int(probs.argmax())
        # Each map is explained by its own stage head; plain's one map by timm's classifier.
        explaining = output.stage_logits or output.logits
        target = torch.stack([lg[0, class_index] for lg in explaining]).sum()
        # autograd.grad, not backward(): nothing accumulates in the shared model's .grad.
        grads = torch.autograd.grad(target, leaves)
    gradcam = [
        unit_maps(torch.relu((g[0].mean(dim=(1, 2))[:, None, None] * f[0].detach())
                              .sum(dim=0))[None], size)[0]
        for f, g in zip(leaves, grads, strict=True)
    ]
    return Explanation(probs=probs.cpu(), class_index=class_index, gradcam=gradcam,
                       activation=activation_maps(features, size))


class _Renderer:
    """Overlays as JPEG data URLs: the jet colour map over the image, as ``crasmra cam`` draws."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        from matplotlib import colormaps

        self.lut = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def image(self, x: Tensor) -> np.ndarray:
        """(1, 3, H, W) normalised tensor -> (H, W, 3) float image in 0..255."""
        arr = x[0].detach().float().cpu().permute(1, 2, 0).numpy()
        return np.clip(arr * self.std + self.mean, 0.0, 1.0) * 255.0

    def overlay(self, image: np.ndarray, heat: np.ndarray) -> np.ndarray:
        """Blend a [0, 1] map's colours over ``image`` (both (H, W[, 3]))."""
        colours = self.lut[np.clip(np.rint(heat * 255), 0, 255).astype(np.intp)]
        return (1.0 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours

    @staticmethod
    def data_url(arr: np.ndarray) -> str:
        buffer = io.BytesIO()
        # JPEG: overlays are photographs under a smooth colour map, where PNG is about ten
        # times larger (a 448 px answer would weigh megabytes) and slower to encode.
        Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=JPEG_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding a pixel."""

    width: int
    height: int
    mode: str
    format: str | None
    progressive: bool = False
    transparency: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode_bytes(self) -> int:
        """About the most memory :func:`crasmra.data.load_image` holds while decoding it.

        Per pixel, by the mode in the header (measured with Pillow 13 at 4 megapixels; PIL
        stores RGB as 4 bytes, and the EXIF orientation step copies): 8 for RGB, greyscale,
        palette and bilevel; 14 for CMYK and the other colour spaces; 24 with alpha (composited
        on white through RGBA copies); 28 for 16-bit; 40 for 32-bit and anything else. Plus 6
        for a progressive JPEG (libjpeg's coefficient buffer), 8 for WebP and 12 for JPEG 2000
        (their decoders' own buffers).
        """
        if self.mode in _ALPHA_MODES or (self.transparency and self.mode == "P"):
            per_pixel = 24
        else:
            per_pixel = _DECODE_BYTES_PER_PIXEL.get(self.mode, _MOST_BYTES_PER_PIXEL)
        per_pixel += _FORMAT_EXTRA_BYTES_PER_PIXEL.get(self.format or "", 0)
        if self.format == "JPEG" and self.progressive:
            per_pixel += 6
        return per_pixel * self.pixels


def read_header(file: BinaryIO, max_pixels: int) -> ImageHeader:
    """Read an image's header (PIL opens lazily: nothing is decoded) and check its size.

    Raises:
        RequestError: 413 more than ``max_pixels`` (or PIL's decompression-bomb limit), 415
            not an image, 422 a header PIL cannot read.
    """
    try:
        with Image.open(file) as probe:
            header = ImageHeader(
                width=probe.width, height=probe.height, mode=probe.mode, format=probe.format,
                progressive=bool(probe.info.get("progressive")),
                transparency="transparency" in probe.info)
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"The image is too large to decode ({err}).") from err
    except Image.UnidentifiedImageError as err:
        raise RequestError(415, "This is not an image in a format PIL can read "
                                "(JPEG, PNG, WebP, BMP, TIFF, GIF...).") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(422, f"The image is broken: {err}") from err
    if header.pixels > max_pixels:
        raise RequestError(
            413, f"The image is {header.width} x {header.height} = {header.pixels / 1e6:.1f} "
                 f"megapixels; this server accepts at most {max_pixels / 1e6:.1f} "
                 "(--max-pixels).")
    return header


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode uploaded bytes to an RGB image, refusing too many pixels before decoding.

    Decoding goes through :func:`crasmra.data.load_image` (via a temporary file), so an upload
    is read exactly as ``crasmra predict`` reads the same file: EXIF orientation, alpha on
    white, 16-bit scaling, PIL's decompression-bomb guard.

    Raises:
        RequestError: 400 empty, 413 too many pixels, 415 not an image, 422 broken image.
    """
    if not data:
        raise RequestError(400, "The file is empty.")
    read_header(io.BytesIO(data), max_pixels)
    with tempfile.TemporaryDirectory(prefix="crasmra-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path)
        except ImageLoadError as err:
            raise RequestError(422, f"The image is broken: {err.reason}.") from err


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` off Linux or on another C library (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only; elsewhere a no-op).

    PIL allocates a large image in blocks of up to 16 MiB, which glibc serves from the worker
    threads' arenas once its adaptive mmap threshold has grown; freed, they may stay in the
    process. Measured after 12 concurrent 40-megapixel requests with 6 turns: 57 MB above the
    idle size stayed without the trim, 10 MB with it. Costs a few milliseconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Predictor:
    """The model behind the API: one image in, a JSON-ready answer out.

    Thread-safe: the network runs under a lock (Grad-CAM's graph and CRAM's recorded
    importance live on the shared module), while decoding and drawing, which touch only the
    request's own data, run outside it.
    """

    def __init__(self, model: CRASMRANet, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
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


# ---------------------------------------------------------------------------------------------
# the HTTP side
# ---------------------------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` inside a route; an HTTPException so the route answers 413."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class _BodyTimeout(StarletteHTTPException):
    """Raised from ``receive`` when a body stalls; answered 408 and the connection closed
    (what is left of the body would otherwise be read as the next request)."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message, headers={"Connection": "close"})


def _parse_host(value: str) -> str | None:
    """The host name of a ``Host`` header value (lower case, without port or IPv6 brackets),
    or ``None`` when the value is not ``host[:port]`` (e.g. ``localhost:1@evil.com``)."""
    match = _HOST_HEADER.fullmatch(value.strip().lower())
    if match is None or (match["port"] and int(match["port"]) > 65535):
        return None
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return None
        return match["ipv6"]
    return match["name"]


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status,
                "headers": [*response.raw_headers, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": response.body})


class Guard:
    """ASGI middleware in front of every route: Host check, body limits, security headers.

    The body's size is limited on the declared ``Content-Length`` before anything is read, and
    on the bytes actually received as they stream in (chunked uploads declare no length), so
    an oversized upload is never buffered or parsed. Its time is limited too: a body not
    complete ``body_timeout`` seconds after the request's headers is answered 408 and the
    connection closed, so a client that declares more than it sends (or trickles it) does not
    hold a connection and a place in the queue for ever.
    """

    def __init__(self, app: Any, *, max_body: int, allowed_hosts: frozenset[str] | None,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts
        self.body_timeout = body_timeout

    def _too_large(self) -> str:
        return (f"The upload is larger than this server accepts ({self.max_body / 2**20:.0f} "
                "MiB with the form; --max-upload-mb).")

    def _too_slow(self) -> str:
        return (f"The request body did not arrive within {self.body_timeout:g} s "
                "(--body-timeout).")

    def _host_ok(self, values: list[str]) -> bool:
        if len(values) > 1:  # RFC 9112: exactly one Host
            return False
        if not values:  # HTTP/1.0 may omit it; a loopback-only server needs it
            return self.allowed_hosts is None
        name = _parse_host(values[0])
        return name is not None and (self.allowed_hosts is None or name in self.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout
        raw_headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                       for k, v in scope.get("headers", [])]
        if not self._host_ok([v for k, v in raw_headers if k == "host"]):
            await _send_json(send, 400, {"error": "Invalid Host header."})
            return
        headers = dict(raw_headers)
        declared = headers.get("content-length")
        if declared is not None:
            if re.fullmatch(r"[0-9]+", declared.strip()) is None:
                await _send_json(send, 400, {"error": "Invalid Content-Length header."})
                return
            if int(declared) > self.max_body:
                await _send_json(send, 413, {"error": self._too_large()})
                return
        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect, which may take any time
                return await receive()
            with anyio.move_on_after(deadline - time.monotonic()) as timer:
                message = await receive()
            if timer.cancelled_caught:
                raise _BodyTimeout(self._too_slow())
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body:
                    raise _BodyTooLarge(self._too_large())
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except (_BodyTooLarge, _BodyTimeout) as err:
            if not started:
                await _send_json(send, err.status_code, {"error": err.detail}, err.headers)


class _Gate:
    """Admission to the work that holds decoded pixels: ``slots`` turns and a bounded queue.

    ``admit`` counts a request in (False, to refuse it, when ``slots + queue`` are inside
    already). ``slot(turns)`` then waits, first come first served, until ``turns`` of the
    ``slots`` are free: an image that takes more memory to decode than one turn allows holds
    several. Lives on the event loop (only coroutines touch it, so no lock), and a waiting
    request holds no thread. Futures are made on the running loop when needed, so one app can
    serve from one loop after another (tests).
    """

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.queue = queue
        self.inside = 0  # admitted and not yet left: waiting or running
        self.running = 0  # turns held
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._seconds = 1.0  # moving average of a turn, for Retry-After

    def admit(self) -> bool:
        """Count a request in; False when the server is full."""
        if self.inside >= self.slots + self.queue:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        """Count an admitted request out."""
        self.inside -= 1

    def retry_after(self) -> int:
        """Seconds until the queue has probably moved on, for ``Retry-After``."""
        return max(1, math.ceil(self._seconds * self.inside / self.slots))

    @contextlib.asynccontextmanager
    async def slot(self, turns: int = 1, *, first: bool = False) -> AsyncIterator[None]:
        """Hold ``turns`` turns for the block's duration, waiting for them in order
        (``first``: ahead of the queue, for a request that has waited its turn already)."""
        await self._acquire(turns, first)
        start = time.monotonic()
        try:
            yield
        finally:
            self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - start)
            self._release(turns)

    async def _acquire(self, turns: int, first: bool) -> None:
        if not self._waiters and self.running + turns <= self.slots:
            self.running += turns
            return
        entry = (turns, asyncio.get_running_loop().create_future())
        if first:
            self._waiters.appendleft(entry)
        else:
            self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self._release(turns)  # handed its turns as it was cancelled: pass them on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()  # it may have been holding up the queue
            raise

    def _release(self, turns: int) -> None:
        self.running -= turns
        self._wake()

    def _wake(self) -> None:
        """Hand turns to the waiters at the head of the queue while they fit (in order: a
        large request is not overtaken for ever by small ones)."""
        while self._waiters:
            turns, waiter = self._waiters[0]
            if waiter.done():  # cancelled
                self._waiters.popleft()
                continue
            if self.running + turns > self.slots:
                return
            self._waiters.popleft()
            self.running += turns
            waiter.set_result(None)


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: ``{name: (content, media type)}``."""
    folder = resources.files("crasmra") / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    if "index.html" not in files:
        raise FileNotFoundError(
            f"The web page is missing from the installed package ({folder}/index.html); "
            "reinstall crasmra.")
    return files


def create_app(
    model: CRASMRANet | str | Path,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_hosts: Sequence[str] | None = tuple(LOOPBACK_NAMES),
    examples: Sequence[Example] | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Guard:
    """Build the web app around a model.

    Args:
        model: A network from :func:`crasmra.load_model`, or a checkpoint file to load.
        max_upload_mb: Largest accepted image file, in MiB.
        max_pixels: Largest accepted image, in pixels (width x height), checked before decoding.
        allowed_hosts: Host names the app answers to (``Host`` header); ``None``: any. The
            default, loopback names only, is right for a server bound to loopback.
        examples: Example images; default: :func:`load_examples` of the model's checkpoint.
        max_concurrent: Uploads decoded and run at once, when each fits in one turn (an RGB
            image of ``max_pixels``); the memory bound, see the module docstring.
        max_queue: Uploads that may wait for a turn; more are answered 503 with Retry-After.
        body_timeout: Seconds a request's body may take to arrive; then 408.

    Returns:
        The ASGI app, ready for uvicorn or ``fastapi.testclient.TestClient``: the FastAPI app
        (``.app``) behind :class:`Guard`.

    Raises:
        ValueError: A limit is not a positive finite number (``max_queue``: not negative).
    """
    if not all(math.isfinite(v) and v > 0
               for v in (max_upload_mb, max_pixels, max_concurrent, body_timeout)) \
            or max_queue < 0:
        raise ValueError("max_upload_mb, max_pixels, max_concurrent and body_timeout must be "
                         "positive and finite, max_queue at least 0.")
    if not isinstance(model, CRASMRANet):
        model = load_model(model)
    if examples is None:
        path = getattr(model, "checkpoint_path", None)
        examples = load_examples(path) if path else []
    examples = list(examples)
    predictor = Predictor(model, max_pixels=max_pixels)
    predictor.warm_up()
    gate = _Gate(int(max_concurrent), int(max_queue))
    max_file = int(max_upload_mb * 2**20)
    static = _static_files()
    model_info = {**predictor.info(), "max_upload_bytes": max_file, "max_pixels": int(max_pixels)}

    # No generated docs pages: they would load scripts from a CDN, and the API is four routes.
    app = FastAPI(title="crasmra", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor = predictor
    app.state.gate = gate

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # exc.headers carries 405's Allow and 408's Connection: close.
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The API's format rather than FastAPI's {"detail": [...]}; no echo of the input.
        problems = "; ".join(
            f"{' '.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}"
            for error in exc.errors())
        return JSONResponse({"error": f"Invalid request ({problems})."}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
        # Routine (a closed tab, a cancelled upload): one line, not a traceback at ERROR.
        log.info("Client left during %s %s", request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it; uvicorn drops it

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("Request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "The server failed on this request; its log says why."},
                            status_code=500)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        content, media = static["index.html"]
        return Response(content, media_type=media)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        # A lookup in the files read at start-up: no path from the URL touches the disk.
        if name not in static:
            raise StarletteHTTPException(404, "Not Found")
        content, media = static[name]
        return Response(content, media_type=media)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return model_info

    @app.get("/api/examples")
    async def example_list() -> list[dict[str, Any]]:
        return [{"index": i, "label": e.label, "url": f"/api/examples/{i}"}
                for i, e in enumerate(examples)]

    @app.get("/api/examples/{index}")
    async def example_image(index: int) -> Response:
        if not 0 <= index < len(examples):
            raise StarletteHTTPException(404, f"No example {index}.")
        return Response(examples[index].png, media_type="image/png")

    # One turn of the gate: an RGB image at the pixel limit and a file at the size limit.
    turn_bytes = RGB_DECODE_BYTES_PER_PIXEL * int(max_pixels) + max_file

    def measure(file: BinaryIO) -> int:
        # In a worker thread, holding one turn (PIL may hold a PNG's text chunks while it
        # reads the header): the turns this upload needs, from its size and its header.
        file.seek(0, io.SEEK_END)
        size = file.tell()
        if size > max_file:
            raise RequestError(413, f"The file is larger than {max_upload_mb:g} MiB "
                                    "(--max-upload-mb).")
        if size == 0:
            raise RequestError(400, "The file is empty.")
        file.seek(0)
        header = read_header(file, max_pixels)
        cost = header.decode_bytes() + size
        turns = math.ceil(cost / turn_bytes)
        if turns > gate.slots:
            raise RequestError(
                413, f"The image is {header.width} x {header.height} in mode {header.mode}: "
                     f"decoding it takes about {cost / 1e6:.0f} MB, more than this server "
                     f"decodes at once ({gate.slots * turn_bytes / 1e6:.0f} MB: "
                     "--max-concurrent x --max-pixels).")
        return max(1, turns)

    def answer(file: BinaryIO) -> dict[str, Any]:
        # The bytes are read from the spooled upload only now, with the turns that pay for
        # them: waiting requests hold at most the parser's 1 MiB in memory.
        file.seek(0)
        return predictor.predict_bytes(file.read())

    @app.post("/api/predict")
    async def predict(request: Request) -> Response:
        # Counted in before the body is read: a full server refuses at once, and the number of
        # uploads held (decoding, or waiting with their files spooled) stays bounded.
        if not gate.admit():
            raise RequestError(
                503, f"The server is busy ({gate.slots} images in progress, {gate.queue} "
                     "waiting: --max-concurrent, --max-queue); try again shortly.",
                headers={"Retry-After": str(gate.retry_after())})
        try:
            form = await request.form(max_files=1, max_fields=4)
            try:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise RequestError(400, "No image: send multipart/form-data with the file "
                                            "in a field named 'image'.")
                async with gate.slot():
                    turns = await run_in_threadpool(measure, upload.file)
                    if turns == 1:
                        result = await run_in_threadpool(answer, upload.file)
                if turns > 1:
                    # Back at the head of the queue for all its turns at once: holding one
                    # while waiting for more could deadlock with another such upload.
                    async with gate.slot(turns, first=True):
                        result = await run_in_threadpool(answer, upload.file)
            finally:
                await form.close()
        finally:
            gate.leave()
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    return Guard(app, max_body=max_file + MULTIPART_SLACK, body_timeout=float(body_timeout),
                 allowed_hosts=None if allowed_hosts is None else frozenset(
                     h.lower().strip("[]") for h in allowed_hosts))


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Binding here rather than in uvicorn turns a busy port into an ``OSError`` the caller can
    report, and lets a test learn the port before the server starts.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run_server(app: Any, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve ``app`` on a bound socket until Ctrl+C (or SIGTERM)."""
    try:
        _uvicorn_server(app, log_level).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully, then re-raises the signal it caught; Ctrl+C is the
        # normal way to stop, not an error worth a traceback.
        log.info("Server stopped")


class ServerThread:
    """Serve an app from a background thread on a free loopback port (tests, notebooks).

    Example::

        with ServerThread(create_app("best.ckpt")) as server:
            print(server.url)
    """

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = _uvicorn_server(app, "warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="crasmra-serve")

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving; returns once the server accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The server thread did not start.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

