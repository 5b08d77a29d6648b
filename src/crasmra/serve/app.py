"""The FastAPI application: routes, request guards and the decode queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from crasmra.errors import MissingExtraError
from crasmra.inference import load_model
from crasmra.model import CRASMRANet
from crasmra.serve.images import (
    read_header,
)
from crasmra.serve.limits import (
    _HOST_HEADER,
    BODY_RATE_GRACE,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_MIN_UPLOAD_RATE,
    LOOPBACK_NAMES,
    MULTIPART_SLACK,
    RGB_DECODE_BYTES_PER_PIXEL,
    SECURITY_HEADERS,
    STATIC_TYPES,
    RequestError,
)
from crasmra.serve.predictor import (
    Example,
    Predictor,
    load_examples,
)

__all__ = [
    "Guard",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "create_app",
]

log = logging.getLogger("crasmra.serve")

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
    connection closed, so a client that declares more than it sends does not hold a
    connection and a place in the queue for ever; and a body that, ``rate_grace`` seconds in,
    has averaged less than ``min_rate`` bytes a second is answered 408 at once, so that
    trickling clients cannot keep the queue full either.
    """

    def __init__(self, app: Any, *, max_body: int, allowed_hosts: frozenset[str] | None,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 min_rate: float = DEFAULT_MIN_UPLOAD_RATE,
                 rate_grace: float = BODY_RATE_GRACE) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts
        self.body_timeout = body_timeout
        self.min_rate = min_rate
        self.rate_grace = rate_grace

    def _too_large(self) -> str:
        return (f"The upload is larger than this server accepts ({self.max_body / 2**20:.0f} "
                "MiB with the form; --max-upload-mb).")

    def _too_slow(self) -> str:
        return (f"The request body did not arrive within {self.body_timeout:g} s "
                "(--body-timeout).")

    def _trickling(self) -> str:
        return (f"The request body arrived at less than {self.min_rate / 1024:g} KiB/s "
                "(--min-upload-rate).")

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
        start = time.monotonic()
        deadline = start + self.body_timeout
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
            # The next bytes must come before the deadline, and before the average rate since
            # the headers (after the grace period) falls under min_rate.
            limit = deadline
            if self.min_rate > 0:
                limit = min(limit, start + self.rate_grace + received / self.min_rate)
            with anyio.move_on_after(limit - time.monotonic()) as timer:
                message = await receive()
            if timer.cancelled_caught:
                raise _BodyTimeout(self._too_slow() if limit >= deadline else self._trickling())
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
    """
    if not all(math.isfinite(v) and v > 0
               for v in (max_upload_mb, max_pixels, max_concurrent, body_timeout)) \
            or max_queue < 0 or not (math.isfinite(min_upload_rate) and min_upload_rate >= 0):
        raise ValueError("max_upload_mb, max_pixels, max_concurrent and body_timeout must be "
                         "positive and finite, max_queue and min_upload_rate at least 0.")
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
                 min_rate=float(min_upload_rate),
                 allowed_hosts=None if allowed_hosts is None else frozenset(
                     h.lower().strip("[]") for h in allowed_hosts))


