"""The HTTP side of the server: the ASGI guard in front of every route (Host check, body
limits, security headers) and the gate that admits work holding decoded pixels."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from crasmra.errors import MissingExtraError
from crasmra.serve.limits import (
    _HOST_HEADER,
    BODY_RATE_GRACE,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MIN_UPLOAD_RATE,
    SECURITY_HEADERS,
)

__all__ = ["Gate", "Guard", "Message", "Receive", "Scope", "Send"]

log = logging.getLogger("crasmra.serve")

try:
    import anyio
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise MissingExtraError(
        "crasmra serve", "serve", "FastAPI, uvicorn and python-multipart"
    ) from _err

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


class Gate:
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
