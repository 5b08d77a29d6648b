"""The FastAPI application: its routes, behind :class:`~crasmra.serve.guard.Guard`."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from crasmra.errors import MissingExtraError
from crasmra.inference import load_model
from crasmra.model import Network
from crasmra.serve.guard import Gate, Guard
from crasmra.serve.images import (
    read_header,
)
from crasmra.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_MIN_UPLOAD_RATE,
    LOOPBACK_NAMES,
    MULTIPART_SLACK,
    RGB_DECODE_BYTES_PER_PIXEL,
    STATIC_TYPES,
    RequestError,
)
from crasmra.serve.predictor import (
    Example,
    Predictor,
    load_examples,
)

__all__ = ["create_app"]

log = logging.getLogger("crasmra.serve")

try:
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
    model: Network | str | Path,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_hosts: Sequence[str] | None = tuple(LOOPBACK_NAMES),
    examples: Sequence[Example] | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    min_upload_rate: float = DEFAULT_MIN_UPLOAD_RATE,
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
        min_upload_rate: Bytes a second a body must average after its first seconds; then
            408 (0: no minimum).

    Returns:
        The ASGI app, ready for uvicorn or ``fastapi.testclient.TestClient``: the FastAPI app
        (``.app``) behind :class:`Guard`.

    Raises:
        ValueError: A limit is not a positive finite number (``max_queue``: not negative).
        crasmra.errors.MissingExtraError: pytorch-grad-cam (the ``viz`` extra) is not
            installed; the warm-up computes a Grad-CAM, so the server does not start without it.
    """
    if not all(math.isfinite(v) and v > 0
               for v in (max_upload_mb, max_pixels, max_concurrent, body_timeout)) \
            or max_queue < 0 or not (math.isfinite(min_upload_rate) and min_upload_rate >= 0):
        raise ValueError("max_upload_mb, max_pixels, max_concurrent and body_timeout must be "
                         "positive and finite, max_queue and min_upload_rate at least 0.")
    if not isinstance(model, Network):
        model = load_model(model)
    if examples is None:
        path = getattr(model, "checkpoint_path", None)
        examples = load_examples(path) if path else []
    examples = list(examples)
    predictor = Predictor(model, max_pixels=max_pixels)
    predictor.warm_up()
    gate = Gate(int(max_concurrent), int(max_queue))
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
                 min_rate=float(min_upload_rate),
                 allowed_hosts=None if allowed_hosts is None else frozenset(
                     h.lower().strip("[]") for h in allowed_hosts))


