"""``crasmra serve CKPT``: a local web page to try a checkpoint on images."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from crasmra.cpu import add_threads_option

# The limits module imports neither FastAPI nor torch: `crasmra --help` stays instant.
from crasmra.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_MIN_UPLOAD_RATE,
    DEFAULT_PORT,
)

#: Largest --max-upload-mb accepted: each upload being decoded is held in memory whole.
MAX_UPLOAD_MB_CAP = 4096


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="a local web page: upload an image, see the top-5 and each stage's maps",
        description="Serve a web page where you pick or drop an image and see the top-5 "
        "classes with probabilities and, for every attended stage, the Grad-CAM of the "
        "predicted class and the activation map over the image. Listens on 127.0.0.1 only "
        "unless --host says otherwise; the server has no authentication.",
    )
    p.add_argument("checkpoint", help="checkpoint (.ckpt) or .safetensors export")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; "
                        "0.0.0.0 exposes the page to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest image file accepted, MiB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest image accepted, width x height, checked before decoding "
                        f"(default: {DEFAULT_MAX_PIXELS:_})")
    p.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT,
                   help="turns of decoding and inference, each worth an RGB image of "
                        "--max-pixels (8 bytes a pixel) and a file of --max-upload-mb; images "
                        "that need more (alpha, 16-bit) take several. Bounds the server's "
                        f"memory above its idle size (default: {DEFAULT_MAX_CONCURRENT})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="uploads that may wait for a turn; more are answered 503 "
                        f"(default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                   help="seconds an upload may take to arrive, then 408 "
                        f"(default: {DEFAULT_BODY_TIMEOUT:g})")
    p.add_argument("--min-upload-rate", type=float, default=DEFAULT_MIN_UPLOAD_RATE / 1024,
                   help="KiB/s an upload must average after its first seconds, then 408; "
                        "trickling clients cannot hold the queue (default: "
                        f"{DEFAULT_MIN_UPLOAD_RATE / 1024:g}; 0: no minimum)")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                   help="seconds a request's headers may take to arrive, then the connection "
                        f"is closed (default: {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (default: cpu)")
    add_threads_option(p)
    p.set_defaults(func=run)


def _warn_exposed(host: str) -> None:
    rule = "!" * 78
    print(f"{rule}\nWARNING: listening on {host}, not on loopback: every machine that can reach "
          "this one\ncan use this page and upload images to it. There is no authentication "
          "and no TLS.\nUse the default --host 127.0.0.1 unless that is what you want.\n"
          f"{rule}", file=sys.stderr)


def run(ns: argparse.Namespace) -> int:
    """Handler of ``crasmra serve``."""
    from crasmra.errors import UsageError

    if not 0 <= ns.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {ns.port}.")
    # float() accepts "inf" and "nan", which would pass a plain "> 0" test (nan) or disable
    # the limit (inf): both are refused here.
    for flag, value in (("--max-upload-mb", ns.max_upload_mb), ("--body-timeout",
                                                                  ns.body_timeout),
                        ("--header-timeout", ns.header_timeout)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive finite number, got {value:g}.")
    if not (math.isfinite(ns.min_upload_rate) and ns.min_upload_rate >= 0):
        raise UsageError(f"--min-upload-rate must be a finite number >= 0, got "
                         f"{ns.min_upload_rate:g}.")
    if ns.max_upload_mb > MAX_UPLOAD_MB_CAP:  # an upload is read into memory whole
        raise UsageError(f"--max-upload-mb must be at most {MAX_UPLOAD_MB_CAP}, got "
                         f"{ns.max_upload_mb:g}.")
    for flag, value, least in (("--max-pixels", ns.max_pixels, 1),
                               ("--max-concurrent", ns.max_concurrent, 1),
                               ("--max-queue", ns.max_queue, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}.")
    # Without the serve extra this raises MissingExtraError (one line), before the port is taken.
    from crasmra import serve
    from crasmra.cpu import configure_cpu
    from crasmra.inference import load_model
    from crasmra.serve.app import create_app

    loopback = serve.is_loopback(ns.host)
    try:
        sock = serve.bind_socket(ns.host, ns.port)
    except OSError as err:
        raise UsageError(f"Cannot listen on {ns.host}:{ns.port} ({err.strerror or err}); is "
                         "another server using the port? Choose one with --port.") from err
    try:
        model = load_model(ns.checkpoint, device=ns.device)
        # A long-running server gives memory back after a burst of large uploads.
        configure_cpu(ns.device, 0, ns.threads, allocator=False)
        # Behind loopback only loopback names are answered (no DNS rebinding); a server
        # exposed on purpose is reached under whatever name the network gives it.
        app = create_app(
            model, max_upload_mb=ns.max_upload_mb, max_pixels=ns.max_pixels,
            max_concurrent=ns.max_concurrent, max_queue=ns.max_queue,
            body_timeout=ns.body_timeout, min_upload_rate=1024 * ns.min_upload_rate,
            allowed_hosts=tuple(serve.LOOPBACK_NAMES) if loopback else None)
        if not loopback:
            _warn_exposed(ns.host)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"crasmra serve: {ns.checkpoint} on http://{shown}:{port}  (Ctrl+C to stop)",
              file=sys.stderr)
        serve.run_server(app, sock, header_timeout=ns.header_timeout)
    finally:
        sock.close()
    return 0
