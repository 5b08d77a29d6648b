"""load_image: every PIL mode to RGB, EXIF orientation, bad files; skipping bad images."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crasmra.data import FGVCImageDataset, ImageLoadError, load_image
from crasmra.data.base import Record


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("1", "PNG"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("RGB", "JPEG"),
        ("P", "GIF"),
        ("YCbCr", "JPEG"),
    ],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    img = Image.new(mode, (6, 5))
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (6, 5)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(_save(rgba, tmp_path / "a.png"))
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(_save(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    path = _save(pal, tmp_path / "p.png", transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)


def test_sixteen_bit_and_float_scaling(tmp_path: Path) -> None:
    arr = np.array([[0, 65535]], dtype=np.uint16)
    i16 = Image.fromarray(arr)
    out = load_image(_save(i16, tmp_path / "i16.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = load_image(_save(f, tmp_path / "f.tiff"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (20, 10)
    assert load_image(path).size == (10, 20)


def _jpeg(tmp_path: Path, name: str = "ok.jpg") -> Path:
    rng = np.random.default_rng(0)
    return _save(
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / name
    )


def test_bad_files_raise_naming_the_file(tmp_path: Path) -> None:
    good = _jpeg(tmp_path).read_bytes()
    cases = {
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "badbody.jpg": good[:200] + b"\x00" * (len(good) - 200),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert name in str(info.value) and isinstance(info.value, OSError)
    with pytest.raises(ImageLoadError, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg")
    err = pickle.loads(pickle.dumps(ImageLoadError("a.jpg", "bad")))
    assert err.path == "a.jpg" and "bad" in str(err)


def test_decompression_bomb_guard_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2x the limit
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the guard is not switched off


def _bad_set(tmp_path: Path) -> list[Record]:
    ok = _jpeg(tmp_path)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(ok.read_bytes()[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return [Record(str(ok), 0), Record(str(trunc), 1), Record(str(empty), 2), Record(str(ok), 3)]


def test_dataset_raises_on_bad_image_by_default(tmp_path: Path) -> None:
    ds = FGVCImageDataset(_bad_set(tmp_path), ["a", "b", "c", "d"])
    assert ds[0][1] == 0
    with pytest.raises(ImageLoadError, match=r"trunc\.jpg"):
        ds[1]


def test_skip_bad_images_warns_once_per_file(tmp_path: Path) -> None:
    ds = FGVCImageDataset(_bad_set(tmp_path), ["a", "b", "c", "d"], skip_bad_images=True, name="t")
    with pytest.warns(UserWarning) as record:
        labels = [ds[i][1] for i in range(len(ds))]
    # Bad samples are replaced by the next good one, deterministically.
    assert labels == [0, 3, 3, 3]
    bad_warnings = [str(w.message) for w in record if "skipping bad image" in str(w.message)]
    assert (
        len(bad_warnings) == 2 and "trunc.jpg" in bad_warnings[0] and "empty.png" in bad_warnings[1]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second pass warns no more
        assert [ds[i][1] for i in range(len(ds))] == [0, 3, 3, 3]
    assert [Path(p).name for p, _ in ds.bad_images] == ["trunc.jpg", "empty.png"]
    assert "2 bad image(s)" in ds.summary()


def test_verify_images_filters_with_one_summary(tmp_path: Path) -> None:
    ds = FGVCImageDataset(_bad_set(tmp_path), ["a", "b", "c", "d"], skip_bad_images=True)
    with pytest.warns(UserWarning, match="2 bad image"):
        bad = ds.verify_images()
    assert len(bad) == 2 and ds.targets == [0, 3] and len(ds) == 2
    with pytest.raises(ImageLoadError):
        FGVCImageDataset(_bad_set(tmp_path), ["a", "b", "c", "d"]).verify_images()


def test_image_bytes_roundtrip_helper() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, "PNG")
    assert buf.getvalue().startswith(b"\x89PNG")
