"""The server's limits and the request error every part of it raises.
"""

from __future__ import annotations

import logging
import re

__all__ = [
    "BODY_RATE_GRACE",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_UPLOAD_MB",
    "DEFAULT_MIN_UPLOAD_RATE",
    "DEFAULT_PORT",
    "EXAMPLE_MAX_SIDE",
    "JPEG_QUALITY",
    "LOOPBACK_NAMES",
    "MAX_EXAMPLES",
    "MAX_IMAGE_SIDE",
    "MULTIPART_SLACK",
    "RGB_DECODE_BYTES_PER_PIXEL",
    "SECURITY_HEADERS",
    "STATIC_TYPES",
    "TOP_K",
    "TRIM_MIN_PIXELS",
    "RequestError",
]

log = logging.getLogger("crasmra.serve")


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
#: Bytes per second a body must average once BODY_RATE_GRACE seconds have passed: a client
#: trickling a byte every few seconds holds a place in the queue for seconds, not a minute.
DEFAULT_MIN_UPLOAD_RATE = 32 * 1024
BODY_RATE_GRACE = 5.0
#: Seconds a connection may take to send a request's line and headers (the first request,
#: and each later one on a kept-alive connection); then it is closed.
DEFAULT_HEADER_TIMEOUT = 10.0
#: The longest side, in pixels, of an accepted image (the most JPEG and WebP can store). Its
#: pixel count alone does not bound what decoding costs: PIL keeps a pointer and a block per
#: row, so 1 x 40,000,000 pixels took 1.5 GB where a square image of as many took 0.23 GB;
#: at 65,535 x 610 it is back to the square's cost.
MAX_IMAGE_SIDE = 65_535
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


