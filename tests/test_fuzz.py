"""Fuzzed and odd-but-valid images through image loading, dataset items and ``crasmra predict``.

The promise: every file either loads as an RGB image (an item as a ``(3, H, W)`` tensor, a
prediction) or fails with :class:`crasmra.data.ImageLoadError` naming the file (``predict``
reports it and goes on); nothing crashes the process, hangs or exhausts memory.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_cli
from crasmra.data import ImageLoadError, create_dataset, load_image

FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_declared_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width x height`` pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
    img = _noise((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _save(img, "JPEG", exif=exif)


def _palette_with_transparency() -> bytes:
    img = _noise((16, 16), "L").convert("P")
    return _save(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [_noise((24, 24)).convert("P") for _ in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit_png() -> bytes:
    arr = np.linspace(0, 65535, 32 * 16, dtype=np.uint16).reshape(16, 32)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    return _save(img, "PNG")


#: name -> (file name, bytes maker, expected RGB size or None when it must fail).
ODD_IMAGES: dict[str, tuple[str, Callable[[], bytes], tuple[int, int] | None]] = {
    "1x1": ("one.png", lambda: _save(_noise((1, 1)), "PNG"), (1, 1)),
    "strip": ("strip.png", lambda: _save(_noise((10_000, 10)), "PNG"), (10_000, 10)),
    "16-bit": ("deep.png", _sixteen_bit_png, (32, 16)),
    "palette-transparency": ("palette.png", _palette_with_transparency, (16, 16)),
    "cmyk-jpeg": ("cmyk.jpg", lambda: _save(_noise((20, 12), "CMYK"), "JPEG"), (20, 12)),
    "progressive-jpeg": ("progressive.jpg",
                         lambda: _save(_noise((33, 17)), "JPEG", progressive=True), (33, 17)),
    "exif-rotated": ("rotated.jpg", _exif_rotated_jpeg, (20, 40)),
    "animated-gif": ("animated.gif", _animated_gif, (24, 24)),
    "rgba": ("rgba.png", lambda: _save(_noise((9, 7), "RGBA"), "PNG"), (9, 7)),
    "huge-declared": ("huge.png", _huge_declared_png, None),
}


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``folder`` dataset root whose one class holds every odd image."""
    root = tmp_path_factory.mktemp("odd-images")
    for split in ("train", "test"):
        folder = root / split / "odd"
        folder.mkdir(parents=True)
        for name, make, _ in ODD_IMAGES.values():
            (folder / name).write_bytes(make())
    return root


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_odd_but_valid_images_load_as_rgb(kind: str, odd_folder: Path) -> None:
    name, _, expected = ODD_IMAGES[kind]
    path = odd_folder / "train" / "odd" / name
    if expected is None:
        with pytest.raises(ImageLoadError, match="decompression-bomb"):
            load_image(path)
        return
    img = load_image(path)
    assert img.mode == "RGB" and img.size == expected


@pytest.mark.timeout(120)
def test_odd_images_as_dataset_items(odd_folder: Path) -> None:
    dataset = create_dataset("folder", odd_folder, "train", image_size=32, resize_size=36,
                             val_fraction=0.0, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"huge\.png"):
        items = [dataset[i] for i in range(len(dataset))]
    for image, label in items:
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all() and label == 0
    assert [Path(p).name for p, _ in dataset.bad_images] == ["huge.png"]
    strict = create_dataset("folder", odd_folder, "train", image_size=32, resize_size=36,
                            val_fraction=0.0)
    huge = next(i for i, (p, _) in enumerate(strict.samples) if p.endswith("huge.png"))
    with pytest.raises(ImageLoadError, match=r"huge\.png"):
        strict[huge]


def _seed_images() -> list[bytes]:
    return [make() for name, make, ok in ODD_IMAGES.values() if ok and name != "strip.png"]


SEEDS = _seed_images()


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, truncated, or both; or plain random bytes."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(min_size=0, max_size=512))
    data = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    if choice in (1, 3):
        for offset in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[offset] = draw(st.integers(0, 255))
    if choice in (2, 3):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.timeout(120)
@FUZZ
@given(data=damaged_images(), suffix=st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp"]))
def test_fuzzed_bytes_load_or_raise_image_load_error(data: bytes, suffix: str,
                                                     tmp_path: Path) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        img = load_image(path)
    except ImageLoadError as err:
        assert err.path == str(path)
    else:
        assert img.mode == "RGB" and min(img.size) >= 1


@pytest.mark.timeout(180)
@FUZZ
@given(blobs=st.lists(damaged_images(), min_size=1, max_size=4))
def test_fuzzed_files_as_dataset_items(blobs: list[bytes], tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("fuzz-folder")
    for split in ("train", "test"):
        folder = root / split / "fuzz"
        folder.mkdir(parents=True)
        for i, blob in enumerate(blobs):
            (folder / f"{i}.png").write_bytes(blob)
    dataset = create_dataset("folder", root, "train", image_size=16, resize_size=18,
                             val_fraction=0.0, skip_bad_images=True)
    for i in range(len(dataset)):
        try:
            image, _ = dataset[i]
        except ImageLoadError as err:
            assert "failed to load" in str(err)  # every file of the split is bad
        else:
            assert image.shape == (3, 16, 16)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint: Path):
    inference = pytest.importorskip("crasmra.inference")
    return inference.load_model(tiny_checkpoint, device="cpu")


@pytest.mark.timeout(120)
@FUZZ
@given(blobs=st.lists(damaged_images(), min_size=1, max_size=4))
def test_fuzzed_files_through_predict(blobs: list[bytes], tiny_model, tmp_path_factory) -> None:
    from crasmra.inference import predict

    folder = tmp_path_factory.mktemp("fuzz-predict")
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(blob)
    result = predict(tiny_model, [str(p) for p in paths], top_k=2, batch_size=2)
    assert len(result.predictions) + len(result.failures) == len(paths)
    for pred in result.predictions:
        assert len(pred.labels) == 2 and all(0.0 <= p <= 1.0 for p in pred.probabilities)


@pytest.mark.timeout(120)
def test_predict_command_on_odd_images(odd_folder: Path, tiny_checkpoint: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("crasmra.inference")
    code = run_cli(["predict", str(tiny_checkpoint), str(odd_folder / "train"), "--format=json",
                    "--top-k=1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    good = {name for name, _, ok in ODD_IMAGES.values() if ok}
    assert {Path(p["path"]).name for p in report["predictions"]} == good
    assert [Path(f["path"]).name for f in report["failures"]] == ["huge.png"]
    assert "huge.png" in captured.err

