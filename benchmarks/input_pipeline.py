"""Input-pipeline throughput: images/s per DataLoader worker for decode + training augmentation.

Generates real-sized JPEGs (500x375, quality 90, about 80 kB: smooth content plus sensor-like
noise, like a CUB photo) and measures, in one thread as a DataLoader worker runs:

* ``pil``: the project's path, :func:`crasmra.data.load_image` (PIL decode, EXIF transpose,
  RGB) + :func:`crasmra.data.build_transforms` ``(train=True, 448, resize 550)`` with a
  random crop (``random_crop=True``; a centre crop costs the same).
* ``tv``: ``torchvision.io.decode_jpeg`` to a uint8 tensor, then the same augmentation with
  ``torchvision.transforms.v2`` on the tensor (resize 550 with antialias, random crop 448,
  flip, float + normalise).
* ``tv-crop-first``: as ``tv`` but the random 448 crop of the 550 image is taken from the
  decoded image first and only that region is resized to 448 (the same pixels up to edge
  interpolation, 34% fewer resized output pixels).
* ``tv-crop-first-u8``: as ``tv-crop-first`` but the worker stops at the flipped uint8 crop;
  float conversion and normalisation move to the GPU (a quarter of the bytes to pin and copy).
* ``tensor``: the library's own fast path, ``FGVCDataModule(decode_backend="tensor")``:
  :func:`crasmra.data.load_image_tensor` + ``build_transforms(train=True, backend="tensor")``.
* ``tensor-u8``: as ``tensor`` with ``normalize_on_device=True`` (``normalize=False``: the
  worker returns uint8; the data module normalises after the transfer).

Each path is split into decode and augment time. Then a real ``DataLoader`` (batch 32) is
timed for 1..``--max-workers`` workers with the ``pil`` and ``tensor-u8`` paths.

Usage::

    python benchmarks/input_pipeline.py --images 64 --max-workers 2
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from benchlib import markdown_table
from crasmra.data import build_transforms, load_image, load_image_tensor
from crasmra.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

PATHS: tuple[str, ...] = (
    "pil", "tv", "tv-crop-first", "tv-crop-first-u8", "tensor", "tensor-u8",
)
LOADER_PATHS: tuple[str, ...] = ("pil", "tensor-u8")


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375),
               quality: int = 90, seed: int = 0) -> list[Path]:
    """Write ``count`` photo-like JPEGs of ``size`` (w, h) and return their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        # Low-frequency colour field (scene) + Gaussian noise (texture, sensor noise): plain
        # noise would compress far worse than a photo, a smooth field far better.
        low = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8))
        base = np.asarray(low.resize(size, Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def tensor_train_transform(image_size: int = 448, resize_size: int = 550) -> v2.Compose:
    """``build_transforms(train=True)``'s augmentation on a uint8 CHW tensor (torchvision v2)."""
    return v2.Compose([
        v2.Resize((resize_size, resize_size), antialias=True),
        v2.RandomCrop(image_size),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class CropFirst:
    """Random crop of the *resized* image expressed in source coordinates, then one resize.

    Equivalent to resize(550) -> RandomCrop(448) up to interpolation at the crop's edges, but
    it resizes only to 448 x 448 instead of 550 x 550.
    """

    def __init__(self, image_size: int = 448, resize_size: int = 550,
                 normalize: bool = True) -> None:
        self.image_size, self.resize_size = image_size, resize_size
        steps: list = [v2.RandomHorizontalFlip()]
        if normalize:
            steps += [v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
        self.post = v2.Compose(steps)

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        sy, sx = h / self.resize_size, w / self.resize_size
        slack = self.resize_size - self.image_size
        top, left = random.randint(0, slack), random.randint(0, slack)
        region = v2.functional.resized_crop(
            img, round(top * sy), round(left * sx), round(self.image_size * sy),
            round(self.image_size * sx), [self.image_size, self.image_size], antialias=True)
        return self.post(region)


def decode_tv(path: str | Path) -> Tensor:
    """Decode a JPEG with libjpeg-turbo through torchvision, to RGB uint8 (3, H, W)."""
    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def pipeline(name: str) -> tuple[Callable[[Path], object], Callable[[object], Tensor]]:
    """``(decode, augment)`` of a path in :data:`PATHS`."""
    if name == "pil":
        return load_image, build_transforms(train=True, image_size=448, resize_size=550,
                                            random_crop=True)
    if name == "tv":
        return decode_tv, tensor_train_transform()
    if name == "tv-crop-first":
        return decode_tv, CropFirst()
    if name == "tv-crop-first-u8":
        return decode_tv, CropFirst(normalize=False)
    if name in ("tensor", "tensor-u8"):
        augment = build_transforms(train=True, image_size=448, resize_size=550, backend="tensor",
                                   random_crop=True, normalize=name == "tensor")
        return load_image_tensor, augment
    raise ValueError(f"path must be one of {PATHS}, got {name!r}")


def per_worker_rates(paths: list[Path], names: tuple[str, ...] = PATHS,
                     rounds: int = 3) -> dict[str, dict[str, float]]:
    """Per-image ms of decode and augment and images/s, in one thread, alternating paths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run torch single-threaded
    try:
        fns = {n: pipeline(n) for n in names}
        times: dict[str, dict[str, list[float]]] = {n: {"decode": [], "augment": []} for n in names}
        for _ in range(rounds):
            for n, (decode, augment) in fns.items():
                dec = aug = 0.0
                for p in paths:
                    t0 = time.perf_counter()
                    img = decode(p)
                    t1 = time.perf_counter()
                    augment(img)
                    t2 = time.perf_counter()
                    dec, aug = dec + t1 - t0, aug + t2 - t1
                times[n]["decode"].append(dec / len(paths))
                times[n]["augment"].append(aug / len(paths))
    finally:
        torch.set_num_threads(threads)
    out = {}
    for n in names:
        dec = float(np.median(times[n]["decode"]))
        aug = float(np.median(times[n]["augment"]))
        out[n] = {"decode_ms": dec * 1e3, "augment_ms": aug * 1e3, "img_s": 1.0 / (dec + aug)}
    return out


class JpegDataset(Dataset):
    """The JPEGs through one of :data:`PATHS`, with a dummy label."""

    def __init__(self, paths: list[Path], name: str = "pil") -> None:
        self.paths = paths
        self.name = name
        self.decode, self.augment = pipeline(name)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.augment(self.decode(self.paths[index])), 0


def loader_rate(paths: list[Path], workers: int, name: str = "pil", batch: int = 32,
                epochs: int = 2) -> float:
    """Images/s of a DataLoader with ``workers`` persistent workers (first epoch = warm-up)."""
    loader = DataLoader(JpegDataset(paths, name), batch_size=batch, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - start))
    del loader
    return rates[-1]


def workers_needed(train_img_s: float, per_worker_img_s: float) -> int:
    """Workers at which loading keeps up with training (assuming a free core per worker)."""
    return max(1, math.ceil(train_img_s / per_worker_img_s))


def pipeline_table(rates: dict[str, dict[str, float]], train_img_s: dict[str, float]) -> str:
    """Markdown table of per-worker rates and the workers each training rate needs."""
    base = rates.get("pil", next(iter(rates.values())))["img_s"]
    header = ["decode path", "decode ms/img", "augment ms/img", "img/s per worker", "vs pil"]
    header += [f"workers for {k}" for k in train_img_s]
    rows = []
    for n, r in rates.items():
        row = [n, f"{r['decode_ms']:.2f}", f"{r['augment_ms']:.2f}", f"{r['img_s']:.1f}",
               f"{r['img_s'] / base:.2f}x"]
        row += [str(workers_needed(v, r["img_s"])) for v in train_img_s.values()]
        rows.append(row)
    return markdown_table(header, rows)


def jpeg_size_kb(paths: list[Path]) -> float:
    """Mean file size in kB."""
    return float(np.mean([p.stat().st_size for p in paths])) / 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--train-img-s", type=float, action="append", default=[],
                        help="training images/s to compare against (repeatable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        print(f"{len(paths)} JPEGs 500x375 q90, mean {jpeg_size_kb(paths):.0f} kB")
        rates = per_worker_rates(paths, rounds=args.rounds)
        targets = {f"{v:g} img/s": v for v in args.train_img_s}
        print(pipeline_table(rates, targets))
        for name in LOADER_PATHS:
            for w in range(1, args.max_workers + 1):
                rate = loader_rate(paths, w, name)
                print(f"DataLoader {name}, {w} worker(s): {rate:.1f} img/s")


if __name__ == "__main__":
    main()
