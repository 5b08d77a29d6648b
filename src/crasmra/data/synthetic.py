"""A built-in SYNTHETIC fine-grained dataset, generated on the fly (no files, no download)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from crasmra.data.base import SPLITS, stratified_split

__all__ = ["PART_PATTERNS", "SYNTHETIC_LIMITS", "SyntheticFGVC", "check_synthetic_options"]

# Each part of the object carries one of these marking patterns; a class is one
# combination. "plain" means no marking on that part.
PART_PATTERNS: dict[str, tuple[str, ...]] = {
    "head": ("plain", "band", "cap", "eyes"),
    "wing": ("plain", "bar", "tips", "spots"),
    "tail": ("plain", "band", "tip", "spots"),
    "body": ("plain", "stripe", "collar", "spots"),
}
_STREAMS = {"train": 0, "test": 1}
DEFAULT_TRAIN_SAMPLES, DEFAULT_TEST_SAMPLES = 60, 20
#: The ranges of the synthetic set's settings (``--data.options``, or the same settings stored
#: in a checkpoint), wide enough for any experiment and narrow enough that no value makes
#: crasmra allocate without bound or render for ever: at most 256 classes x 10,000 images per
#: split stream, 1024 px images, 1,000 clutter shapes each.
SYNTHETIC_LIMITS: dict[str, tuple[float, float]] = {
    "num_classes": (2, 256),
    "samples_per_class": (1, 10_000),
    "test_samples_per_class": (1, 10_000),
    "native_size": (32, 1024),
    "seed": (0, 2**63 - 1),
    "clutter": (0, 1_000),
    "max_rotation": (0.0, 180.0),
}
#: Rendered images each process keeps (see SyntheticFGVC.__getitem__), in bytes.
RENDER_CACHE_BYTES = 256 * 2**20


def _number(name: str, value: object, integer: bool) -> float:
    low, high = SYNTHETIC_LIMITS[name]
    span = f"an integer in {int(low)}..{int(high)}" if integer else f"a number in {low:g}..{high:g}"
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or (integer and value != int(value)) or not low <= value <= high):
        raise ValueError(f"synthetic option {name} must be {span}, got {value!r}; change "
                         f"--data.options {{{name}: ...}}")
    return int(value) if integer else float(value)


def check_synthetic_options(options: dict[str, object]) -> dict[str, float]:
    """Check the values of the synthetic set's options (names are checked by the factory).

    Each must be a finite number in its :data:`SYNTHETIC_LIMITS` range (``max_rotation`` may
    be fractional, the others are integers; ``None`` means the default).

    Returns:
        The options as numbers (``1e3`` -> ``1000``).

    Raises:
        ValueError: A value of the wrong type, not finite, or out of range.
    """
    return {
        name: _number(name, value, integer=name != "max_rotation")
        for name, value in options.items()
        if name in SYNTHETIC_LIMITS and value is not None
    }

Point = tuple[float, float]

# Canonical object geometry (half-length 1, head towards +x, seen from above): a
# bird/plane-like silhouette shared by every class.
_BODY_A, _BODY_B = 0.55, 0.17
_HEAD_C, _HEAD_R = (0.66, 0.0), 0.16
_WING = (
    (0.18, 0.10),
    (-0.12, 0.85),
    (-0.34, 0.85),
    (-0.18, 0.10),
)  # root-front, tip-front, tip-back, root-back
_TAIL_X0, _TAIL_X1, _TAIL_W0, _TAIL_W1 = -0.48, -0.92, 0.06, 0.27


def _ellipse(cx: float, cy: float, a: float, b: float, n: int = 28) -> list[Point]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return list(zip(cx + a * np.cos(t), cy + b * np.sin(t), strict=True))


def _wing_point(t: float, u: float, side: int) -> Point:
    """Point at span fraction ``t`` and chord fraction ``u`` of the wing on ``side`` (+1/-1)."""
    rf, tf, tb, rb = _WING
    front = (rf[0] + t * (tf[0] - rf[0]), rf[1] + t * (tf[1] - rf[1]))
    back = (rb[0] + t * (tb[0] - rb[0]), rb[1] + t * (tb[1] - rb[1]))
    x, y = front[0] + u * (back[0] - front[0]), front[1] + u * (back[1] - front[1])
    return (x, side * y)


def _wing_band(t0: float, t1: float, side: int) -> list[Point]:
    return [
        _wing_point(t0, 0, side),
        _wing_point(t1, 0, side),
        _wing_point(t1, 1, side),
        _wing_point(t0, 1, side),
    ]


def _tail_band(s0: float, s1: float) -> list[Point]:
    def at(s: float) -> tuple[float, float]:
        return _TAIL_X0 + s * (_TAIL_X1 - _TAIL_X0), _TAIL_W0 + s * (_TAIL_W1 - _TAIL_W0)

    (x0, w0), (x1, w1) = at(s0), at(s1)
    return [(x0, w0), (x1, w1), (x1, -w1), (x0, -w0)]


def _marking_polygons(part: str, pattern: str) -> list[list[Point]]:
    """The marking of ``part`` in canonical coordinates, as filled polygons."""
    if pattern == "plain":
        return []
    hx, hy = _HEAD_C
    if part == "head":
        if pattern == "band":
            return [[(hx - 0.07, -0.16), (hx + 0.05, -0.16), (hx + 0.05, 0.16), (hx - 0.07, 0.16)]]
        if pattern == "cap":
            return [_ellipse(hx + 0.02, hy, 0.10, 0.10)]
        return [_ellipse(hx + 0.05, s * 0.085, 0.05, 0.05) for s in (-1, 1)]  # eyes
    if part == "wing":
        if pattern == "bar":
            return [_wing_band(0.40, 0.62, s) for s in (-1, 1)]
        if pattern == "tips":
            return [_wing_band(0.76, 1.0, s) for s in (-1, 1)]
        spots = []
        for s in (-1, 1):
            for t in (0.35, 0.72):
                x, y = _wing_point(t, 0.5, s)
                spots.append(_ellipse(x, y, 0.065, 0.065))
        return spots
    if part == "tail":
        if pattern == "band":
            return [_tail_band(0.30, 0.56)]
        if pattern == "tip":
            return [_tail_band(0.72, 1.0)]
        return [_ellipse(-0.78, s * 0.12, 0.06, 0.06) for s in (-1, 1)]
    # body
    if pattern == "stripe":
        return [[(-0.42, -0.04), (0.42, -0.04), (0.42, 0.04), (-0.42, 0.04)]]
    if pattern == "collar":
        return [[(0.36, -0.12), (0.46, -0.10), (0.46, 0.10), (0.36, 0.12)]]
    return [_ellipse(x, 0.0, 0.05, 0.05) for x in (-0.3, 0.0, 0.3)]


def _gray_code(k: int, base: int, digits: int) -> list[int]:
    """Modular ``base``-ary Gray code of ``k``: consecutive ``k`` differ in exactly one digit."""
    d = []
    for _ in range(digits):
        d.append(k % base)
        k //= base
    d = d[::-1]  # most significant first
    return [d[0]] + [(d[i] - d[i - 1]) % base for i in range(1, digits)]


def _class_codes(num_classes: int) -> tuple[tuple[str, ...], list[list[int]]]:
    """Parts used and each class's pattern index per part.

    Three parts (head, wing, tail) with up to 4 patterns each cover 64 classes, four parts
    cover 256. The classes are taken along a Gray-code walk (every second code when there
    is room, so all parts vary): neighbouring classes differ in one or two parts.
    """
    n_parts = 3 if num_classes <= 64 else 4
    n_values = max(2, math.ceil(num_classes ** (1.0 / n_parts) - 1e-9))
    while n_values**n_parts < num_classes:
        n_values += 1
    stride = min(2, n_values**n_parts // num_classes)
    parts = tuple(PART_PATTERNS)[:n_parts]
    return parts, [_gray_code(k * stride, n_values, n_parts) for k in range(num_classes)]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


class SyntheticFGVC(Dataset):
    """A SYNTHETIC fine-grained classification set, generated deterministically from a seed.

    It is not real data: it exists so the project runs with no download. Every class shares
    one bird/plane-like silhouette (body, head, two wings, tail) and classes differ only in
    small markings on several parts (head band/cap/eyes, wing bar/tips/spots, tail
    band/tip/spots); each class is one combination, and neighbouring classes differ in one
    or two parts. Random rotation and mirroring, scale, position, body/marking colours,
    cluttered backgrounds with marking-like distractors, brightness/contrast jitter and
    noise make it a fine-grained problem rather than a colour lookup.

    Images are rendered lazily from ``(seed, stream, index)``, so DataLoader workers agree.
    "train" and "val" are a seeded stratified split of one stream; "test" uses another.

    Args:
        split: "train", "val" or "test".
        num_classes: Number of classes (2..256). The ranges of this and the other numbers
            are :data:`SYNTHETIC_LIMITS`; a value outside them is refused here, before a
            loader worker would fail on it.
        samples_per_class: Images per class in the training stream, which "train" and
            "val" share (default 60: 54 train + 6 val per class at ``val_fraction=0.1``).
        test_samples_per_class: Images per class in the test stream (default 20).
        image_size: Side of the generated square image (before any transform).
        seed: Generator seed; the same seed gives the same images.
        transform: Applied to the PIL image; ``None`` returns the PIL image.
        val_fraction: Fraction of the train stream used as val (0 disables val).
        split_seed: Seed of the train/val split.
        max_rotation: Maximum absolute rotation in degrees (images are also mirrored).
        clutter: Number of background distractor shapes is drawn from ``[clutter // 2, clutter]``.
    """

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 10,
        samples_per_class: int | None = None,
        test_samples_per_class: int | None = None,
        image_size: int = 128,
        seed: int = 0,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        max_rotation: float = 30.0,
        clutter: int = 8,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        checked = check_synthetic_options({
            "num_classes": num_classes, "samples_per_class": samples_per_class,
            "test_samples_per_class": test_samples_per_class, "native_size": image_size,
            "seed": seed, "clutter": clutter, "max_rotation": max_rotation,
        })
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) \
                or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
            raise ValueError(f"split_seed must be an integer >= 0, got {split_seed!r}")
        num_classes, image_size = checked["num_classes"], checked["native_size"]
        seed, clutter, max_rotation = checked["seed"], checked["clutter"], checked["max_rotation"]
        if split == "test":
            spc = checked.get("test_samples_per_class", DEFAULT_TEST_SAMPLES)
        else:
            spc = checked.get("samples_per_class", DEFAULT_TRAIN_SAMPLES)
        if split == "val" and val_fraction == 0:
            raise ValueError(
                "split='val' requested but val_fraction=0 disables it; set val_fraction > 0"
            )
        self.split = split
        self.num_classes = int(num_classes)
        self.samples_per_class = spc
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.transform = transform
        self.max_rotation = float(max_rotation)
        self.clutter = int(clutter)
        self.parts, self.codes = _class_codes(self.num_classes)
        self.classes = [
            " ".join(f"{p}-{PART_PATTERNS[p][v]}" for p, v in zip(self.parts, code, strict=True))
            for code in self.codes
        ]
        self._stream = _STREAMS["test" if split == "test" else "train"]
        n = spc * self.num_classes
        stream_targets = [i % self.num_classes for i in range(n)]
        if split == "test":
            self.indices = list(range(n))
        else:
            train_idx, val_idx = stratified_split(stream_targets, val_fraction, split_seed)
            self.indices = val_idx if split == "val" else train_idx
        self.targets = [stream_targets[i] for i in self.indices]
        self._rendered: dict[int, Image.Image] = {}
        self._cache_items = RENDER_CACHE_BYTES // (3 * self.image_size**2)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        # Rendering costs far more than the augmentation that follows, and an image depends
        # only on its index: keep each one after its first use (a few MB; per worker process),
        # up to RENDER_CACHE_BYTES.
        img = self._rendered.get(index)
        if img is None:
            img = self.render(self.indices[index])
            if len(self._rendered) < self._cache_items:
                self._rendered[index] = img
        label = self.targets[index]
        return (self.transform(img) if self.transform is not None else img), label

    @property
    def attributes(self) -> list[dict[str, str]]:
        """Per class, the marking pattern of every part."""
        return [
            {p: PART_PATTERNS[p][v] for p, v in zip(self.parts, code, strict=True)}
            for code in self.codes
        ]

    def render(self, stream_index: int) -> Image.Image:
        """Generate image ``stream_index`` of this split's stream (label = index % classes)."""
        rng = np.random.default_rng([self.seed, self._stream, int(stream_index)])
        label = int(stream_index) % self.num_classes
        ss = 2  # supersampling factor, so thin markings are antialiased
        size = self.image_size * ss
        img = self._background(rng, size)
        draw = ImageDraw.Draw(img)
        self._clutter(rng, draw, size)

        # Pose: rotation (+ mirror), scale, position.
        theta = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        if rng.random() < 0.5:
            theta = math.pi - theta
        half = size * rng.uniform(0.36, 0.46)
        margin = size / 2 - 0.85 * half
        cx = size / 2 + rng.uniform(-margin, margin)
        cy = size / 2 + rng.uniform(-margin, margin)
        cos_t, sin_t = math.cos(theta), math.sin(theta)

        def tf(points: list[Point]) -> list[Point]:
            return [
                (cx + half * (x * cos_t - y * sin_t), cy - half * (x * sin_t + y * cos_t))
                for x, y in points
            ]

        body_rgb = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.35, 0.95))
        wing_rgb = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in body_rgb)
        lum = 0.299 * body_rgb[0] + 0.587 * body_rgb[1] + 0.114 * body_rgb[2]
        # Markings contrast with the body (dark on light, light on dark) in a random hue,
        # so their shape and place carry the class, not their colour.
        if lum > 128:
            mark_rgb = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.0, 0.2))
        else:
            mark_rgb = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.85, 1.0))
        outline = tuple(int(c * 0.6) for c in body_rgb)

        for side in (-1, 1):
            wing = [(x, side * y) for x, y in _WING]
            draw.polygon(tf(wing), fill=wing_rgb, outline=outline)
        draw.polygon(tf(_tail_band(0.0, 1.0)), fill=wing_rgb, outline=outline)
        draw.polygon(tf(_ellipse(0.0, 0.0, _BODY_A, _BODY_B, 40)), fill=body_rgb, outline=outline)
        draw.polygon(tf(_ellipse(*_HEAD_C, _HEAD_R, _HEAD_R)), fill=body_rgb, outline=outline)
        draw.polygon(tf([(0.80, 0.045), (0.97, 0.0), (0.80, -0.045)]), fill=outline)  # beak

        for part, value in zip(self.parts, self.codes[label], strict=True):
            for poly in _marking_polygons(part, PART_PATTERNS[part][value]):
                draw.polygon(tf(poly), fill=mark_rgb)

        img = img.resize((self.image_size, self.image_size), Image.Resampling.BOX)
        return self._photometric(rng, img)

    def _background(self, rng: np.random.Generator, size: int) -> Image.Image:
        c0 = np.array(_hsv(rng.random(), rng.uniform(0, 0.7), rng.uniform(0.2, 0.95)), np.float32)
        c1 = np.array(_hsv(rng.random(), rng.uniform(0, 0.7), rng.uniform(0.2, 0.95)), np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)
        arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
        return Image.fromarray(arr.astype(np.uint8))

    def _clutter(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
        """Random shapes, some shaped like the markings, so no single cue is the label."""
        for _ in range(int(rng.integers(self.clutter // 2, self.clutter + 1))):
            rgb = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.1, 1.0))
            x, y = rng.uniform(0, size, 2)
            r = size * rng.uniform(0.02, 0.12)
            kind = rng.integers(0, 4)
            if kind == 0:
                draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=rgb)
            elif kind == 1:
                x2, y2 = rng.uniform(0, size, 2)
                draw.line([x, y, x2, y2], fill=rgb, width=int(rng.integers(1, 4) * 2))
            elif kind == 2:
                pts = [
                    (x + r * math.cos(a), y + r * math.sin(a))
                    for a in rng.uniform(0, 2 * math.pi, 3)
                ]
                draw.polygon(pts, fill=rgb)
            else:  # small marking-like dot
                rr = size * 0.02
                draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=rgb)

    def _photometric(self, rng: np.random.Generator, img: Image.Image) -> Image.Image:
        arr = np.asarray(img, dtype=np.float32)
        mean = arr.mean()
        arr = (arr - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)
        arr = arr * rng.uniform(0.85, 1.15, size=3)  # per-channel colour cast
        arr = arr + rng.normal(0.0, rng.uniform(0, 8), size=arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
