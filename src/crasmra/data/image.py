"""Robust image loading: any PIL mode to RGB, EXIF orientation, clear errors."""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import pil_to_tensor

from crasmra.data.errors import ImageLoadError

__all__ = ["file_problem", "load_image", "load_image_tensor"]

logger = logging.getLogger(__name__)

# Colour that transparent pixels are composited onto. White, because transparent regions
# in FGVC-style photos and cut-outs are meant to be shown on a light page; compositing on
# black would invent strong artificial edges around the object.
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image to 8-bit grey.

    ``I;16*`` covers 0..65535 and is divided by 257. ``I`` and ``F`` carry no declared
    range, so the values decide: already 0..255 is kept, 0..1 floats are scaled by 255,
    0..65535 is treated as 16-bit, anything else is min-max scaled.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif lo >= 0.0 and hi <= 65535.0:
            arr = arr / 257.0
        elif hi > lo:
            arr = (arr - lo) * (255.0 / (hi - lo))
        else:
            arr = np.zeros_like(arr)
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to RGB.

    Alpha (RGBA, LA, P with a transparency entry, ...) is composited onto white
    (:data:`ALPHA_BACKGROUND`); 16-bit and float images are rescaled to 8 bits; CMYK and
    YCbCr use PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(img).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


# What a path that is not a regular file is, for the message: such a path is never read as an
# image (a FIFO blocks the reader, a character device such as /dev/urandom never ends).
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be an image file, from its type alone, or ``None`` if it may be one.

    Only regular files (or links to them) qualify. One ``stat`` call and no read, so dataset
    scans refuse such entries before training starts; the content is judged when decoding.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        return f"cannot read file ({err.strerror or err})"
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a file")
        return (
            f"not a regular file but {kind}; only regular files are read as images: "
            "remove it or put the image file there"
        )
    return None


def _check_file(path: Path) -> None:
    """Raise :class:`ImageLoadError` for a path that is not a non-empty regular file."""
    problem = file_problem(path)
    if problem is None and path.stat().st_size == 0:
        problem = "the file is empty (0 bytes): remove it or replace it with the image"
    if problem is not None:
        raise ImageLoadError(str(path), problem)


@contextmanager
def _pil_errors(path: Path) -> Iterator[None]:
    """Turn PIL's exceptions into :class:`ImageLoadError` naming ``path``."""
    try:
        yield
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            str(path),
            f"larger than PIL's decompression-bomb limit ({err}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS deliberately if this file is trusted",
        ) from err
    except Image.UnidentifiedImageError as err:
        raise ImageLoadError(
            str(path),
            "not a recognised image format (corrupt, or not an image): replace or remove it",
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(
            str(path), f"corrupt or truncated image ({err}): replace or remove it"
        ) from err


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as an RGB PIL image with its EXIF orientation applied.

    Every PIL mode is converted to RGB (see :func:`to_rgb`; transparency is composited on
    white). PIL's decompression-bomb guard stays on.

    Args:
        path: Image file.

    Returns:
        A fully decoded ``RGB`` image.

    Raises:
        ImageLoadError: The file is missing, empty, not a regular file (a directory, FIFO or
            device), truncated, corrupt, not an image, or larger than PIL's
            decompression-bomb limit. The message names the file.
    """
    path = Path(path)
    _check_file(path)
    with _pil_errors(path), Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


# Byte offset of the bit depth in a PNG file: 8-byte signature, then the IHDR chunk's length,
# type, width and height (4 bytes each).
_PNG_BIT_DEPTH_OFFSET = 24


def _fast_decodable(img: Image.Image, raw: bytes) -> bool:
    """Whether torchvision decodes this file to exactly what :func:`load_image` returns.

    Only 8-bit RGB and greyscale JPEG/PNG without transparency or animation qualify: CMYK,
    palette and alpha images (composited on white by :func:`to_rgb`), 16-bit and low-depth
    PNGs (rescaled differently) and multi-frame files take the PIL route.
    """
    if img.format not in ("JPEG", "PNG") or img.mode not in ("RGB", "L"):
        return False
    if "transparency" in img.info or getattr(img, "is_animated", False):
        return False
    return img.format == "JPEG" or (
        len(raw) > _PNG_BIT_DEPTH_OFFSET and raw[_PNG_BIT_DEPTH_OFFSET] == 8
    )


def load_image_tensor(path: str | os.PathLike[str]) -> Tensor:
    """Load an image as an RGB ``uint8`` tensor ``(3, H, W)``, EXIF orientation applied.

    8-bit RGB/greyscale JPEGs and PNGs are decoded by ``torchvision.io.decode_image``
    (libjpeg-turbo / libpng, no PIL image in between), which gives the same pixels as
    :func:`load_image` with this torchvision and Pillow (checked by the tests). Every other
    file, and any file torchvision fails on, takes the :func:`load_image` route, so the
    result always equals ``pil_to_tensor(load_image(path))``.

    The header is opened with PIL first (lazy: nothing is decoded), which applies PIL's
    decompression-bomb check to the declared size before any pixel is decoded.

    Raises:
        ImageLoadError: As :func:`load_image`; the message names the file.
    """
    path = Path(path)
    _check_file(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ImageLoadError(str(path), f"cannot read file ({err.strerror or err})") from err
    with _pil_errors(path), Image.open(io.BytesIO(raw)) as img:
        fast = _fast_decodable(img, raw)
    if fast:
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns
                # on every call; the decoder still works and is the fast path here.
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                    mode=ImageReadMode.RGB,
                    apply_exif_orientation=True,
                )
        except RuntimeError:
            # Truncated or corrupt data: PIL decides (it may still decode it, or raises the
            # same ImageLoadError as load_image).
            logger.debug("torchvision could not decode %s; using PIL", path)
    return pil_to_tensor(load_image(path))
