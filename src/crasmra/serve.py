"""A local web page to try a checkpoint: upload an image, see the top-5 and where each stage looks.

``crasmra serve CKPT`` runs :func:`create_app` with uvicorn. The page (``crasmra/static/``, no
external assets, so it works offline) talks to a small JSON API:

- ``GET /api/info``: class names, model description and the server's limits.
- ``POST /api/predict``: a multipart form with one ``image`` file ->
  ``{"top_k": [{"rank", "index", "label", "probability"}], "input": JPEG data URL of the
  image as the network saw it, "stages": [{"name", "gradcam", "activation"}] (JPEG data URLs
  of the overlays), "image_size": [w, h], "elapsed_ms"}``. Errors are ``{"error": message}``
  with a 4xx status (413: too large, 415: not an image, 422: a broken image).
- ``GET /api/examples`` and ``GET /api/examples/{i}``: a few test-split images of the
  dataset the checkpoint was trained on, when that dataset can be found (the synthetic set
  is always regenerated).

Safety: the CLI binds to loopback unless told otherwise, and then only answers requests whose
``Host`` is a loopback name (a web page elsewhere cannot reach it through DNS rebinding);
request bodies are limited while they stream in, before anything is parsed; the pixel count
is read from the image header before decoding; errors never carry a traceback. Requests share
nothing but the read-only model and examples, and the model is used by one request at a time.

Grad-CAM is computed here in one pass rather than with :func:`crasmra.viz.gradcam_maps` (one
forward and one full backward pass per stage): see :func:`explain_tensor`.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from crasmra.data import ImageLoadError, create_dataset, load_image
from crasmra.inference import load_model, run_dataset_config
from crasmra.model import CRASMRANet
from crasmra.viz import OVERLAY_ALPHA, activation_maps

SERVE_HINT = 'crasmra serve needs the serve extra: pip install "crasmra[serve]"'
try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(SERVE_HINT) from _err

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_MB",
    "DEFAULT_PORT",
    "Example",
    "Explanation",
    "Guard",
    "Predictor",
    "RequestError",
    "ServerThread",
    "bind_socket",
    "create_app",
    "decode_image",
    "explain_tensor",
    "is_loopback",
    "load_examples",
    "run_server",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000
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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def _unit_maps(maps: Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    """(S, h, w) maps -> S arrays (H, W), bilinearly upsampled and min-max scaled to [0, 1]."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                       align_corners=False)[:, 0]
    flat = up.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return list(((flat - lo) / (hi - lo).clamp_min(1e-7)).view_as(up).cpu().numpy())


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
        _unit_maps(torch.relu((g[0].mean(dim=(1, 2))[:, None, None] * f[0].detach())
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
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"The image is too large to decode ({err}).") from err
    except Image.UnidentifiedImageError as err:
        raise RequestError(415, "This is not an image in a format PIL can read "
                                "(JPEG, PNG, WebP, BMP, TIFF, GIF...).") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(422, f"The image is broken: {err}") from err
    if width * height > max_pixels:
        raise RequestError(
            413, f"The image is {width} x {height} = {width * height / 1e6:.1f} megapixels; this "
                 f"server accepts at most {max_pixels / 1e6:.1f} (--max-pixels).")
    with tempfile.TemporaryDirectory(prefix="crasmra-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path)
        except ImageLoadError as err:
            raise RequestError(422, f"The image is broken: {err.reason}.") from err


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
        config = getattr(model, "transform_config", None) or {}
        self.renderer = _Renderer(
            config.get("mean", model.data_config.get("mean", (0.485, 0.456, 0.406))),
            config.get("std", model.data_config.get("std", (0.229, 0.224, 0.225))))

    def warm_up(self) -> None:
        """Run one blank image through the network, so the first user does not wait for
        PyTorch's lazy initialisation (about twice a normal request on a CPU)."""
        config = getattr(self.model, "transform_config", None) or {}
        h, w = _size_hw(config.get("image_size", self.model.data_config["input_size"][1:]))
        with self._lock:
            explain_tensor(self.model, torch.zeros(1, 3, h, w, device=self.device))

    def info(self) -> dict[str, Any]:
        """Model description for ``/api/info``."""
        config = getattr(self.model, "transform_config", None) or {}
        size = config.get("image_size")
        return {
            "classes": list(self.model.classes),
            "num_classes": self.model.num_classes,
            "backbone": self.model.config["backbone"],
            "variant": self.model.variant,
            "stage_names": list(self.model.stage_names),
            "image_size": list(size) if isinstance(size, list | tuple) else size,
            # The file name only: the page has no use for the server's folder layout.
            "checkpoint": Path(getattr(self.model, "checkpoint_path", "") or "model").name,
            "top_k": min(TOP_K, self.model.num_classes),
        }

    def predict_bytes(self, data: bytes) -> dict[str, Any]:
        """Decode, predict and draw one uploaded image (see the module docstring's JSON)."""
        start = time.perf_counter()
        image = decode_image(data, self.max_pixels)
        x = self.model.transform(image).unsqueeze(0).to(self.device)
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
            "image_size": [image.width, image.height],
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


def _host_name(header: str) -> str:
    """The host name of a ``Host`` header value, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status,
                "headers": [*response.raw_headers, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": response.body})


class Guard:
    """ASGI middleware in front of every route: Host check, body limit, security headers.

    The body limit is enforced on the declared ``Content-Length`` before anything is read,
    and on the bytes actually received as they stream in (chunked uploads declare no length),
    so an oversized upload is never buffered or parsed.
    """

    def __init__(self, app: Any, *, max_body: int, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts

    def _too_large(self) -> str:
        return (f"The upload is larger than this server accepts ({self.max_body / 2**20:.0f} "
                "MiB with the form; --max-upload-mb).")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and \
                _host_name(headers.get("host", "")) not in self.allowed_hosts:
            await _send_json(send, 400, {"error": "Invalid Host header."})
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_json(send, 400, {"error": "Invalid Content-Length header."})
                return
            if int(declared) > self.max_body:
                await _send_json(send, 413, {"error": self._too_large()})
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"error": self._too_large()})


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
) -> Guard:
    """Build the web app around a model.

    Args:
        model: A network from :func:`crasmra.load_model`, or a checkpoint file to load.
        max_upload_mb: Largest accepted image file, in MiB.
        max_pixels: Largest accepted image, in pixels (width x height), checked before decoding.
        allowed_hosts: Host names the app answers to (``Host`` header); ``None``: any. The
            default, loopback names only, is right for a server bound to loopback.
        examples: Example images; default: :func:`load_examples` of the model's checkpoint.

    Returns:
        The ASGI app, ready for uvicorn or ``fastapi.testclient.TestClient``: the FastAPI app
        (``.app``) behind :class:`Guard`.
    """
    if max_upload_mb <= 0 or max_pixels <= 0:
        raise ValueError("max_upload_mb and max_pixels must be positive.")
    if not isinstance(model, CRASMRANet):
        model = load_model(model)
    if examples is None:
        path = getattr(model, "checkpoint_path", None)
        examples = load_examples(path) if path else []
    examples = list(examples)
    predictor = Predictor(model, max_pixels=max_pixels)
    predictor.warm_up()
    max_file = int(max_upload_mb * 2**20)
    static = _static_files()
    model_info = {**predictor.info(), "max_upload_bytes": max_file, "max_pixels": int(max_pixels)}

    # No generated docs pages: they would load scripts from a CDN, and the API is four routes.
    app = FastAPI(title="crasmra", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor = predictor

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

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

    @app.post("/api/predict")
    async def predict(request: Request) -> Response:
        form = await request.form(max_files=1, max_fields=4)
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "No image: send multipart/form-data with the file in a "
                                        "field named 'image'.")
            # One byte past the limit tells "too large" from "exactly the limit".
            data = await upload.read(max_file + 1)
        finally:
            await form.close()
        if len(data) > max_file:
            raise RequestError(413, f"The file is larger than {max_upload_mb:g} MiB "
                                    "(--max-upload-mb).")
        result = await run_in_threadpool(predictor.predict_bytes, data)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    return Guard(app, max_body=max_file + MULTIPART_SLACK,
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

