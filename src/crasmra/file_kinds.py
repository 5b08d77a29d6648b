"""What a file is, told from its first bytes: a checkpoint, an export, or something else.

Nothing here imports torch: commands sniff their arguments and outputs before anything heavy
is loaded, and :func:`crasmra.files.check_output` asks what an existing output file holds.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "SAFETENSORS_META_KEY",
    "TORCHSCRIPT_META",
    "ZIP_MAGIC",
    "file_kind",
    "is_safetensors",
    "not_a_checkpoint",
    "read_head",
]

#: Key of the JSON-encoded ``"crasmra"`` entry in a safetensors file's metadata.
SAFETENSORS_META_KEY = "crasmra"
#: Name of the extra file holding the ``"crasmra"`` metadata in a TorchScript export.
TORCHSCRIPT_META = "crasmra.json"
#: Suffixes of checkpoint and weights files: no crasmra command writes over such a file.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
#: First bytes of a zip archive, the container of every torch.save file since PyTorch 1.6.
ZIP_MAGIC = b"PK\x03\x04"
#: First bytes of a Git LFS pointer: the small text file a repository holds in place of a large
#: file until ``git lfs pull`` downloads it.
_LFS_MAGIC = b"version https://git-lfs"
#: The magic number that starts every legacy (pre-1.6) torch.save file, after the pickle header.
_LEGACY_TORCH_MAGIC = b"\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_IMAGE_MAGICS = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}
_CHECKPOINT_HINT = ("Pass a .ckpt written by `crasmra fit`/`crasmra demo`, or a .safetensors "
                    "export from `crasmra export`.")


def read_head(path: Path, size: int = 1024) -> bytes:
    """The first ``size`` bytes of ``path``."""
    with path.open("rb") as f:
        return f.read(size)


def is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are those of a safetensors file."""
    # An 8-byte little-endian header length, then the JSON header itself.
    if len(head) < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= 100 * 2**20 and head[8:9] == b"{"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # The sample may end inside a multi-byte character.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)


def not_a_checkpoint(path: Path) -> tuple[str, str, bool] | None:
    """``(what the file is, what to do, probably a misplaced argument)`` when its first bytes
    show it is no checkpoint; None when it may be one (a zip archive, a legacy torch file or a
    safetensors file, checked further when read)."""
    head = read_head(path)
    if head.startswith(ZIP_MAGIC) or head.startswith(b"\x80") or is_safetensors(head):
        return None
    if head.startswith(_LFS_MAGIC):
        return ("a Git LFS pointer (a small text file that stands for the real file)",
                "Run `git lfs pull` in its repository to download the checkpoint itself.", False)
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(b"<") and any(tag in start for tag in (b"<html", b"<!doctype html",
                                                                 b"<head", b"<body")):
        return ("a web page (HTML)",
                "The download probably failed (a login, error or redirect page was saved "
                "instead); download the checkpoint again.", False)
    for magic, what in _IMAGE_MAGICS.items():
        if head.startswith(magic):
            return what, _CHECKPOINT_HINT, True
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image", _CHECKPOINT_HINT, True
    if path.suffix.lower() == ".onnx":
        return ("an ONNX model", "crasmra commands need the .ckpt written by `crasmra fit` or "
                "a .safetensors export; run ONNX files with onnxruntime.", False)
    if _looks_like_text(head):
        return "a text file", _CHECKPOINT_HINT, True
    return ("in an unknown format (neither a zip archive, the format of torch.save since "
            "PyTorch 1.6, nor a legacy torch or safetensors file)",
            "The file is damaged or of another kind; " + _CHECKPOINT_HINT, False)



def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if length <= 100 * 2**20 else {}
    except (OSError, ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def file_kind(path: str | Path) -> str | None:
    """What an existing file is, as far as overwriting it matters.

    Returns:
        ``"checkpoint"`` (a torch.save file: zip with ``data.pkl`` or legacy format, or a
        safetensors file without crasmra metadata), ``"torchscript"`` and ``"safetensors"``
        (crasmra exports: TorchScript with crasmra metadata, safetensors with the ``"crasmra"``
        entry), ``"other"``, or None when it does not exist or is not a regular file.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return None
        head = read_head(path, 64)
    except OSError:
        return None
    if head.startswith(ZIP_MAGIC):
        names = _zip_names(path)
        if any(n.endswith(f"/extra/{TORCHSCRIPT_META}") for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "checkpoint"
        return "other"
    if _LEGACY_TORCH_MAGIC in head[:32]:
        return "checkpoint"
    if is_safetensors(head):
        meta = _safetensors_metadata(path)
        return "safetensors" if meta and SAFETENSORS_META_KEY in meta else "checkpoint"
    return "other"


