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
while they stream in, before anything is parsed, and in time (408 when one stalls or averages
less than ``min_upload_rate`` after its first seconds); a connection whose request headers take
more than ``header_timeout`` is closed (:func:`header_timeout_protocol`), so slow clients
cannot hold the server; the pixel count and the sides (at most ``MAX_IMAGE_SIDE``) are read
from the image header before decoding; errors never carry a traceback, and a
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

Grad-CAM and the overlays are those of ``crasmra cam`` (:func:`crasmra.viz.stage_gradcams`,
:class:`crasmra.viz.HeatOverlay`): pytorch-grad-cam's GradCAM of each stage, from one backbone
pass. It needs the ``viz`` extra; without it the server refuses to start with the install
command (its warm-up computes a Grad-CAM).
"""

import importlib
from typing import Any

#: Where each public name lives. They are imported on first use (PEP 562): the command line
#: reads the limits' defaults without FastAPI or torch, and a missing FastAPI is reported
#: (MissingExtraError) when the application is first needed.
_PUBLIC = {
    "BODY_RATE_GRACE": "limits",
    "DEFAULT_BODY_TIMEOUT": "limits",
    "DEFAULT_HEADER_TIMEOUT": "limits",
    "DEFAULT_HOST": "limits",
    "DEFAULT_MAX_CONCURRENT": "limits",
    "DEFAULT_MAX_PIXELS": "limits",
    "DEFAULT_MAX_QUEUE": "limits",
    "DEFAULT_MAX_UPLOAD_MB": "limits",
    "DEFAULT_MIN_UPLOAD_RATE": "limits",
    "DEFAULT_PORT": "limits",
    "EXAMPLE_MAX_SIDE": "limits",
    "Example": "predictor",
    "Explanation": "predictor",
    "Guard": "guard",
    "ImageHeader": "images",
    "JPEG_QUALITY": "limits",
    "LOOPBACK_NAMES": "limits",
    "MAX_EXAMPLES": "limits",
    "MAX_IMAGE_SIDE": "limits",
    "MULTIPART_SLACK": "limits",
    "Message": "guard",
    "Predictor": "predictor",
    "RGB_DECODE_BYTES_PER_PIXEL": "limits",
    "Receive": "guard",
    "RequestError": "limits",
    "SECURITY_HEADERS": "limits",
    "STATIC_TYPES": "limits",
    "Scope": "guard",
    "Send": "guard",
    "ServerThread": "server",
    "TOP_K": "limits",
    "TRIM_MIN_PIXELS": "limits",
    "bind_socket": "server",
    "create_app": "app",
    "decode_image": "images",
    "explain_tensor": "predictor",
    "header_timeout_protocol": "server",
    "is_loopback": "server",
    "load_examples": "predictor",
    "read_header": "images",
    "release_memory": "images",
    "run_server": "server",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'crasmra.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"crasmra.serve.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
