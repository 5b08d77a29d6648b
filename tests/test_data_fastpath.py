"""The tensor input pipeline: torchvision decode, v2 transforms, normalisation on the device.

Equivalence with the PIL pipeline is the point: the tensor loader must give the very pixels
``load_image`` gives, and the tensor eval transform the PIL eval transform's output.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from crasmra.data import (
    IMAGENET_DEFAULT_STD,
    FGVCDataModule,
    FGVCImageDataset,
    ImageLoadError,
    build_transforms,
    load_image,
    load_image_tensor,
)
from crasmra.data.base import Record
from crasmra.data.transforms import CropThenResize

# Eval outputs of the two backends, in normalised units. torchvision's antialiased uint8
# bilinear resize is a port of Pillow's and differs only in the rounding of some outputs:
# measured at most one grey level, on 0-2% of pixels for 500x375 -> 550 and up to about 20%
# for tiny non-square resizes. So the tolerance is one grey level (1 / 255 / std, 0.0175
# with the ImageNet std) per value, plus float rounding, and a mean well below it.
GREY_LEVEL = 1 / 255 / min(IMAGENET_DEFAULT_STD)
EVAL_ATOL = GREY_LEVEL + 1e-5
EVAL_MEAN_ATOL = 0.3 * GREY_LEVEL


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour field plus noise: edges and texture like a photo, compresses like one."""
    low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    base = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small files in the formats and modes the loader must handle."""
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    rgb = _photo(rng, 45, 61)
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        out[name] = d / name
        img.save(out[name], **kw)

    save("rgb.jpg", Image.fromarray(rgb), quality=90)
    save("rgb444.jpg", Image.fromarray(rgb), quality=80, subsampling=0)
    save("grey.jpg", Image.fromarray(rgb[..., 0]), quality=90)
    save("rgb.png", Image.fromarray(rgb))
    save("grey.png", Image.fromarray(rgb[..., 1]))
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    save("exif.jpg", rotated, quality=90, exif=exif.tobytes())
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    save("i16.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    rgba = np.dstack([rgb, (rng.random(rgb.shape[:2]) * 255).astype(np.uint8)])
    save("rgba.png", Image.fromarray(rgba))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    palette_t = Image.fromarray(rgb).convert("P")
    save("palette_t.png", palette_t, transparency=0)
    return out


FAST = ["rgb.jpg", "rgb444.jpg", "grey.jpg", "rgb.png", "grey.png", "exif.jpg"]
FALLBACK = ["cmyk.jpg", "i16.png", "rgba.png", "palette.png", "palette_t.png"]


@pytest.mark.parametrize("name", FAST + FALLBACK)
def test_tensor_loader_equals_pil_loader(images: dict[str, Path], name: str) -> None:
    # Exact for JPEG too: Pillow and torchvision decode with the same libjpeg-turbo settings
    # (measured max difference 0, including 4:2:0 chroma upsampling).
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the decoder's warning is silenced
        t = load_image_tensor(images[name])
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    assert torch.equal(t, pil_to_tensor(load_image(images[name])))


def test_fast_path_used_only_where_exact(
    images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import crasmra.data.image as image_mod

    calls: list[str] = []
    real = image_mod.load_image
    monkeypatch.setattr(image_mod, "load_image", lambda p: calls.append(Path(p).name) or real(p))
    for name in FAST + FALLBACK:
        load_image_tensor(images[name])
    assert calls == FALLBACK
    assert load_image_tensor(images["exif.jpg"]).shape == (3, 61, 45)  # rotated upright


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 3), (0, 0, 0, 0)).save(path)
    assert torch.equal(load_image_tensor(path), torch.full((3, 3, 4), 255, dtype=torch.uint8))


def test_tensor_loader_errors_name_the_file(images: dict[str, Path], tmp_path: Path) -> None:
    raw = images["rgb.jpg"].read_bytes()
    cases = {
        "empty.jpg": b"",
        "truncated.jpg": raw[: len(raw) // 2],
        "text.jpg": b"not an image at all",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "missing.jpg"]:
        with pytest.raises(ImageLoadError, match=name) as info:
            load_image_tensor(tmp_path / name)
        # Same reason as the PIL loader gives.
        with pytest.raises(ImageLoadError) as pil_info:
            load_image(tmp_path / name)
        assert info.value.reason == pil_info.value.reason


def test_tensor_loader_bomb_guard(images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny files with a tiny limit: PIL's check on the header size must run before decoding.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    import crasmra.data.image as image_mod

    monkeypatch.setattr(image_mod, "decode_image", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageLoadError, match=r"rgb\.jpg.*decompression-bomb"):
        load_image_tensor(images["rgb.jpg"])


def test_tensor_transforms_shapes_and_dtypes() -> None:
    img = pil_to_tensor(Image.new("RGB", (70, 50), (10, 20, 30)))
    train = build_transforms(True, image_size=32, resize_size=40, backend="tensor")
    assert [type(t).__name__ for t in train.transforms] == [
        "PILToTensor",
        "CropThenResize",
        "RandomHorizontalFlip",
        "ToDtype",
        "Normalize",
    ]
    out = train(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    raw = build_transforms(True, (24, 32), (30, 40), backend="tensor", normalize=False)(img)
    assert raw.shape == (3, 24, 32) and raw.dtype == torch.uint8
    evaluate = build_transforms(False, 32, 40, backend="tensor", normalize=False)
    assert evaluate(img).dtype == torch.uint8 and evaluate(img).shape == (3, 32, 32)
    # PIL input is converted, so the tensor transforms also serve PIL-rendered sets.
    assert build_transforms(False, 32, 40, backend="tensor")(Image.new("RGB", (9, 7))).shape == (
        3,
        32,
        32,
    )
    with pytest.raises(ValueError, match="backend"):
        build_transforms(True, backend="cv2")
    with pytest.raises(ValueError, match="normalize=False"):
        build_transforms(True, normalize=False)


def test_crop_then_resize_matches_resize_then_crop() -> None:
    from torchvision.transforms import v2

    rng = np.random.default_rng(1)
    src = torch.from_numpy(_photo(rng, 150, 200)).permute(2, 0, 1).contiguous()
    # Centre window: compare with resize(55) -> CenterCrop(44) directly.
    ref = build_transforms(
        True, 44, 55, random_crop=False, hflip=False, backend="tensor", normalize=False
    )
    full = v2.CenterCrop(44)(v2.Resize((55, 55), antialias=True)(src))
    diff = (ref(src).int() - full.int()).abs().float()  # grey levels
    # Only the antialiasing filter's support at the window's edges and sub-pixel rounding of
    # the window's position differ; measured mean 1.3, max 8 on this noisy image.
    assert diff.mean() < 3 and diff.max() < 25
    # Random windows stay inside the image and follow torch's RNG.
    crop = CropThenResize((44, 44), (55, 55))
    torch.manual_seed(3)
    a = crop(src)
    torch.manual_seed(3)
    assert torch.equal(a, crop(src)) and a.shape == (3, 44, 44)
    for _ in range(20):
        assert crop(src[:, :50, :30]).shape == (3, 44, 44)  # upsampling sources too


def test_tensor_eval_matches_pil_eval(images: dict[str, Path]) -> None:
    rng = np.random.default_rng(2)
    for h, w in [(75, 100), (100, 75), (64, 64), (30, 41)]:
        pil_img = Image.fromarray(_photo(rng, h, w))
        for size, resize in [(32, 40), ((24, 40), (30, 49))]:
            ref = build_transforms(False, size, resize)(pil_img)
            fast = build_transforms(False, size, resize, backend="tensor")(pil_to_tensor(pil_img))
            assert ref.shape == fast.shape
            assert (ref - fast).abs().max() < EVAL_ATOL
            assert (ref - fast).abs().mean() < EVAL_MEAN_ATOL
    # Through the loaders too (real JPEG decode on both sides).
    path = images["rgb.jpg"]
    ref = build_transforms(False, 32, 40)(load_image(path))
    fast = build_transforms(False, 32, 40, backend="tensor")(load_image_tensor(path))
    assert (ref - fast).abs().max() < EVAL_ATOL


def _folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(4)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_photo(rng, 40 + 7 * i, 52)).save(d / f"{i}.jpg", quality=90)
    return root


def _dm(root: Path, **kw) -> FGVCDataModule:
    args = dict(batch_size=6, num_workers=0, image_size=32, val_fraction=0.0, pin_memory=False)
    return FGVCDataModule("folder", str(root), **{**args, **kw})


def test_datamodule_tensor_backend_matches_pil(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    pil = _dm(root)
    fast = _dm(root, decode_backend="tensor")
    on_device = _dm(root, decode_backend="tensor", normalize_on_device=True)
    ref, _ = next(iter((pil.setup("test"), pil.test_dataloader())[1]))
    x, _ = next(iter((fast.setup("test"), fast.test_dataloader())[1]))
    on_device.setup("test")
    batch = next(iter(on_device.test_dataloader()))
    assert batch[0].dtype == torch.uint8  # workers stop at uint8
    y, labels = on_device.on_after_batch_transfer(batch, 0)
    assert y.dtype == torch.float32 and y.shape == ref.shape == x.shape and y.is_contiguous()
    for out in (x, y):
        assert (ref - out).abs().max() < EVAL_ATOL
        assert (ref - out).abs().mean() < EVAL_MEAN_ATOL
    assert (x - y).abs().max() < 1e-5  # normalising on the device = normalising in the worker
    assert torch.equal(labels, batch[1])
    # Training batches: same shapes and, over a batch, the same statistics.
    for dm in (pil, fast, on_device):
        dm.setup("fit")
    torch.manual_seed(0)
    t_ref, _ = next(iter(pil.train_dataloader()))
    t_fast, _ = next(iter(fast.train_dataloader()))
    t_dev = on_device.on_after_batch_transfer(next(iter(on_device.train_dataloader())), 0)[0]
    for t in (t_fast, t_dev):
        assert t.shape == t_ref.shape and t.dtype == torch.float32
        assert abs(t.mean() - t_ref.mean()) < 0.1 and abs(t.std() - t_ref.std()) < 0.1
    # The checkpointed eval transform stays the PIL one, so inference on PIL images works.
    assert fast.transform_config == pil.transform_config
    assert torch.allclose(
        build_transforms(False, **on_device.transform_config)(
            load_image(fast.test_dataset.samples[0][0])
        ),
        ref[0],
        atol=EVAL_ATOL,
    )


def test_dataset_tensor_backend_bbox_crop_and_verify(images: dict[str, Path]) -> None:
    records = [Record(str(images["rgb.jpg"]), 0, (5, 4, 30.4, 20.6))]
    pil = FGVCImageDataset(records, ["x"], bbox_crop=True)
    fast = FGVCImageDataset(records, ["x"], bbox_crop=True, decode_backend="tensor")
    assert torch.equal(fast[0][0], pil_to_tensor(pil[0][0]))
    assert fast.verify_images() == []
    with pytest.raises(ValueError, match="decode_backend"):
        FGVCImageDataset(records, ["x"], decode_backend="cv2")


def test_synthetic_tensor_backend_on_device() -> None:
    dm = FGVCDataModule(
        "synthetic",
        batch_size=4,
        num_workers=0,
        image_size=32,
        decode_backend="tensor",
        normalize_on_device=True,
        options={"num_classes": 3, "samples_per_class": 4},
    )
    dm.setup("fit")
    x, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decode_backend": "cv2"}, "decode_backend"),
        ({"normalize_on_device": True}, "normalize_on_device=True needs decode_backend='tensor'"),
    ],
)
def test_bad_backend_combination(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FGVCDataModule("synthetic", num_workers=0, **kwargs)
