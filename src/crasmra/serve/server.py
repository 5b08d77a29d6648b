"""Binding a socket and running uvicorn, in the foreground or in a thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from crasmra.serve.limits import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HOST,
)

__all__ = [
    "ServerThread",
    "bind_socket",
    "header_timeout_protocol",
    "is_loopback",
    "run_server",
]

log = logging.getLogger("crasmra.serve")

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


def header_timeout_protocol(header_timeout: float) -> type:
    """uvicorn's h11 HTTP protocol, closing a connection whose request line and headers have
    not all arrived ``header_timeout`` seconds after it opened (or after its previous
    response).

    uvicorn limits the size of a request's headers but not their time: a client that sends a
    header line every few seconds holds its connection (and a file descriptor) for as long as
    it likes, and a hundred such clients hold a hundred.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request's headers, if any
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("Closing a connection whose request headers took more than %g s",
                         header_timeout)
                self.transport.close()

    return HeaderTimeoutProtocol


def _uvicorn_server(app: Any, log_level: str,
                    header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False,
                            timeout_graceful_shutdown=5,
                            http=header_timeout_protocol(header_timeout))
    return uvicorn.Server(config)


def run_server(app: Any, sock: socket.socket, *, log_level: str = "info",
               header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
    """Serve ``app`` on a bound socket until Ctrl+C (or SIGTERM); a connection whose request
    headers take more than ``header_timeout`` seconds is closed."""
    try:
        _uvicorn_server(app, log_level, header_timeout).run(sockets=[sock])
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

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = _uvicorn_server(app, "warning", header_timeout)
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

