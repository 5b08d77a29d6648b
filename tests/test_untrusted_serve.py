"""The web server and its clients (issue 24, item 12): image sides bounded from the header,
trickling bodies and slow headers cut off."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from crasmra.inference import load_model
from crasmra.model import CRASMRANet
from untrusted_helpers import png


# ---------------------------------------------------------------------------------------------
# 12. serve
# ---------------------------------------------------------------------------------------------
def test_serve_bounds_each_side_from_the_header(tmp_path: Path) -> None:
    from crasmra.serve import MAX_IMAGE_SIDE, RequestError, read_header

    # 1 x 70,000 pixels: far under the pixel limit, but PIL's cost grows with the rows.
    path = png(tmp_path / "tall.png", (1, MAX_IMAGE_SIDE + 1), "1")
    with path.open("rb") as f, pytest.raises(RequestError) as caught:
        read_header(f, 40_000_000)
    assert caught.value.status == 413 and "a side" in caught.value.message


@pytest.fixture(scope="module")
def serve_model(tiny_checkpoint: Path) -> CRASMRANet:
    pytest.importorskip("fastapi")
    return load_model(tiny_checkpoint)


def _post(port: int, body: bytes, trickle: float | None = None) -> str:
    boundary = "b24"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + body + \
        f"\r\n--{boundary}--\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     f"multipart/form-data; boundary={boundary}\r\nContent-Length: "
                     f"{len(form)}\r\n\r\n".encode())
        try:
            if trickle is None:
                sock.sendall(form)
            else:
                for byte in form:
                    sock.sendall(bytes([byte]))
                    time.sleep(trickle)
            reply = sock.recv(4096)
        except OSError:
            return "closed"
    return reply.split(b" ", 2)[1].decode() if reply else "closed"


@pytest.mark.timeout(120)
def test_trickling_clients_cannot_hold_the_queue(serve_model: CRASMRANet,
                                                 tmp_path: Path) -> None:
    from crasmra.serve import ServerThread, create_app

    app = create_app(serve_model, examples=[], max_concurrent=1, max_queue=2, body_timeout=20)
    app.rate_grace = 1.0  # seconds before the minimum rate applies (5 by default)
    image = png(tmp_path / "a.png", (64, 64)).read_bytes()
    with ServerThread(app) as server:
        statuses: list[str] = []
        tricklers = [threading.Thread(target=lambda: statuses.append(
            _post(server.port, image, trickle=0.3)), daemon=True) for _ in range(3)]
        for thread in tricklers:
            thread.start()
        time.sleep(0.5)  # all three places taken
        deadline = time.monotonic() + 8
        answer = _post(server.port, image)
        while answer == "503" and time.monotonic() < deadline:
            time.sleep(0.5)
            answer = _post(server.port, image)
        assert answer == "200"
        for thread in tricklers:
            thread.join(timeout=30)
    assert statuses and all(s in ("408", "closed") for s in statuses), statuses


@pytest.mark.timeout(60)
def test_slow_request_headers_are_cut_off(serve_model: CRASMRANet) -> None:
    from crasmra.serve import ServerThread, create_app

    with ServerThread(create_app(serve_model, examples=[]), header_timeout=1.0) as server:
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        start = time.monotonic()
        while time.monotonic() - start < 3:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.2)
        still_open = 0
        for sock in socks:
            sock.settimeout(1)
            try:
                still_open += sock.recv(1) != b""
            except TimeoutError:
                still_open += 1
            except OSError:
                pass
            sock.close()
        assert still_open == 0
        # A normal request on a fresh connection is still answered.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
