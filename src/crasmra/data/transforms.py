"""Train / eval transforms of the paper's recipe and backbone normalisation values."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import v2

__all__ = [
    "BACKENDS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_RESIZE_SIZE",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "CropThenResize",
    "DeviceNormalize",
    "Preprocessing",
    "build_transforms",
    "check_normalization",
    "default_resize_size",
    "normalization_for_backbone",
    "to_hw",
]

logger = logging.getLogger(__name__)

# The same values as timm.data.IMAGENET_DEFAULT_MEAN/STD, kept here so that importing the
# data package does not import timm.
IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 448
DEFAULT_RESIZE_SIZE = 550

Size = int | Sequence[int]
BACKENDS = ("pil", "tensor")


#: The largest image side, in pixels, a transform accepts.
MAX_SIDE = 4096


def to_hw(size: Size, name: str = "size") -> tuple[int, int]:
    """Normalise an ``int`` or ``(h, w)`` size to a ``(h, w)`` tuple of positive ints."""
    if isinstance(size, bool):
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {size!r}")
    if isinstance(size, int):
        hw = (size, size)
    else:
        try:
            hw = tuple(int(v) for v in size)
        except TypeError as err:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {size!r}") from err
        if len(hw) != 2 or any(int(v) != v for v in size):
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    if max(hw) > MAX_SIDE:
        # Far beyond any fine-grained recipe (224-600 px); a batch of such images would only
        # exhaust memory after minutes of loading.
        raise ValueError(f"{name} must be at most {MAX_SIDE} pixels per side, got {size!r}")
    return hw  # type: ignore[return-value]


#: Ranges of the per-channel normalisation (0..1 pixel scale): real statistics of images lie
#: far inside them (ImageNet: mean 0.4-0.5, std 0.22-0.23); outside, a value is a mistake or
#: a tampered file, and would turn every input into huge or non-finite numbers.
MAX_ABS_MEAN = 10.0
STD_RANGE = (1e-3, 10.0)


def check_normalization(
    mean: object, std: object
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Check a normalisation's ``mean`` and ``std``: three finite numbers each, within
    ``|mean| <= MAX_ABS_MEAN`` and ``STD_RANGE``.

    Returns:
        ``(mean, std)`` as tuples of floats.

    Raises:
        ValueError: Not three numbers (a string, a boolean, NaN or infinity included), or out
            of range.
    """
    out = []
    for name, values, low, high in (("mean", mean, -MAX_ABS_MEAN, MAX_ABS_MEAN),
                                    ("std", std, *STD_RANGE)):
        try:
            ok = not isinstance(values, str | bytes) and len(values) == 3 and all(  # type: ignore[arg-type]
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and low <= v <= high for v in values)  # type: ignore[union-attr]
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be 3 finite numbers in [{low:g}, {high:g}] (one per RGB "
                             f"channel, on the 0..1 pixel scale), got {values!r}")
        out.append(tuple(float(v) for v in values))  # type: ignore[union-attr]
    return out[0], out[1]  # type: ignore[return-value]


def default_resize_size(image_size: Size) -> tuple[int, int]:
    """The paper's resize for a crop size: 550/448 of it (448 -> 550), per side."""
    h, w = to_hw(image_size, "image_size")
    scale = DEFAULT_RESIZE_SIZE / DEFAULT_IMAGE_SIZE
    return (round(h * scale), round(w * scale))


class CropThenResize:
    """``Resize(resize) -> RandomCrop(crop)`` as one resize: the crop is chosen in source pixels.

    The crop window of the resized image is mapped back to the source image and only that
    region is resized, straight to ``crop``: the same pixels up to interpolation at the
    window's edges and a sub-pixel rounding of its position, at about 66% of the resize work
    (448 x 448 instead of 550 x 550 output pixels). A ``RandomResizedCrop`` with a fixed scale
    of ``crop / resize`` per side and the aspect change of the full resize.

    Works on ``uint8`` or float tensors ``(..., H, W)`` and on PIL images (converted to a
    ``uint8`` tensor first). The position is drawn from torch's RNG, which DataLoader seeds
    per worker.

    Args:
        crop: Output ``(h, w)``.
        resize: The ``(h, w)`` the reference transform resizes to before cropping.
        random: Random window (``RandomCrop``); ``False`` takes the centre (``CenterCrop``).
    """

    def __init__(self, crop: tuple[int, int], resize: tuple[int, int], random: bool = True) -> None:
        self.crop, self.resize, self.random = tuple(crop), tuple(resize), random

    def __call__(self, img: Tensor | Image.Image) -> Tensor:
        if isinstance(img, Image.Image):
            img = v2.functional.pil_to_tensor(img)
        h, w = img.shape[-2:]
        (ch, cw), (rh, rw) = self.crop, self.resize
        if self.random:
            top = int(torch.randint(0, rh - ch + 1, (1,)))
            left = int(torch.randint(0, rw - cw + 1, (1,)))
        else:  # the offsets CenterCrop uses
            top, left = round((rh - ch) / 2.0), round((rw - cw) / 2.0)
        sy, sx = h / rh, w / rw
        src_h, src_w = max(1, round(ch * sy)), max(1, round(cw * sx))
        src_top = min(round(top * sy), h - src_h)
        src_left = min(round(left * sx), w - src_w)
        return v2.functional.resized_crop(
            img,
            src_top,
            src_left,
            src_h,
            src_w,
            list(self.crop),
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=True,
        )

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(crop={self.crop}, resize={self.resize}, random={self.random})"


def build_transforms(
    train: bool,
    image_size: Size = DEFAULT_IMAGE_SIZE,
    resize_size: Size | None = DEFAULT_RESIZE_SIZE,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    random_crop: bool = False,
    hflip: bool = True,
    backend: str = "pil",
    normalize: bool = True,
) -> Callable:
    """Build the paper's transform (SPEC, "Training recipe").

    Train: resize to ``resize_size`` (both sides, aspect not kept) -> ``CenterCrop(image_size)``
    (``RandomCrop`` when ``random_crop`` is True) -> random horizontal flip (if ``hflip``)
    -> tensor -> normalise. Eval: resize -> ``CenterCrop(image_size)`` -> tensor -> normalise.
    The paper (section 4.1) centre-crops for training and testing alike.

    ``backend="pil"`` (the default, and what checkpoints rebuild for inference) runs these
    steps on PIL images. ``backend="tensor"`` runs them with ``torchvision.transforms.v2`` on
    ``uint8`` tensors ``(3, H, W)`` (PIL images are converted first): eval is the same resize
    and centre crop (torchvision's antialiased ``uint8`` bilinear resize reproduces PIL's to
    within one grey level), and training resizes only the crop window (:class:`CropThenResize`,
    centre or random), about twice as fast: the same window, up to interpolation at its edges
    and a sub-pixel rounding of its position.

    Args:
        train: Training (augmenting) or evaluation transform.
        image_size: Crop size, int or ``(h, w)``.
        resize_size: Resize before cropping, int or ``(h, w)``; ``None`` uses 550/448 of
            ``image_size``. Must be at least ``image_size`` on both sides.
        mean: Per-channel normalisation mean (0..1 scale).
        std: Per-channel normalisation std.
        random_crop: Random crop in training; False (default) takes the centre crop, as the
            paper does for training and testing.
        hflip: Random horizontal flip in training.
        backend: "pil" or "tensor".
        normalize: Convert to float and normalise; ``False`` (only with "tensor") returns
            the ``uint8`` tensor, to be normalised after the transfer to the device.

    Returns:
        A callable taking a PIL RGB image (or, for "tensor", a ``uint8`` tensor) to a float
        tensor ``(3, h, w)`` (``uint8`` with ``normalize=False``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not normalize and backend != "tensor":
        raise ValueError("normalize=False needs backend='tensor' (the PIL path returns floats)")
    crop = to_hw(image_size, "image_size")
    resize = default_resize_size(crop) if resize_size is None else to_hw(resize_size, "resize_size")
    if resize[0] < crop[0] or resize[1] < crop[1]:
        raise ValueError(
            f"resize_size {resize} is smaller than image_size {crop}; "
            "set resize_size >= image_size (the paper uses 550 for 448)"
        )
    mean_t, std_t = check_normalization(tuple(mean), tuple(std))
    if backend == "tensor":
        return _tensor_transforms(train, crop, resize, mean_t, std_t, random_crop, hflip, normalize)
    steps: list = [T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if train:
        steps.append(T.RandomCrop(crop) if random_crop else T.CenterCrop(crop))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps.append(T.CenterCrop(crop))
    steps += [T.ToTensor(), T.Normalize(mean_t, std_t)]
    return T.Compose(steps)


def _tensor_transforms(
    train: bool,
    crop: tuple[int, int],
    resize: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    random_crop: bool,
    hflip: bool,
    normalize: bool,
) -> v2.Compose:
    # PILToTensor only acts on PIL images (tensors pass through), so both inputs work.
    steps: list = [v2.PILToTensor()]
    if train:
        steps.append(CropThenResize(crop, resize, random=random_crop))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(crop),
        ]
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class DeviceNormalize:
    """The normalisation that ``normalize=False`` leaves out, applied to a batch on its device.

    ``uint8`` images ``(N, 3, H, W)`` become float32 ``(x / 255 - mean) / std``. The constants
    are made once per device, so each batch costs one multiply-add.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        stats = self._stats.get(images.device)
        if stats is None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device)
            std = torch.tensor(self.std, dtype=torch.float32, device=images.device)
            # (x / 255 - mean) / std as one multiply-add: x * scale + shift.
            scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
            shift = (-mean / std).view(1, 3, 1, 1)
            stats = self._stats[images.device] = (scale, shift)
        scale, shift = stats
        return torch.addcmul(shift, images.to(torch.float32), scale)


def normalization_for_backbone(
    name: str | None,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std of a timm backbone's pretrained config, as plain tuples.

    Only timm's pretrained-config registry is consulted (no model is built, nothing is
    downloaded). Unknown names, or ``None``, fall back to the ImageNet defaults.

    Args:
        name: A timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``).

    Returns:
        ``(mean, std)``, each a tuple of three floats.
    """
    if not name:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    try:
        import timm.models

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception as err:  # any lookup failure means "unknown backbone" here
        logger.debug("no timm pretrained cfg for %r: %s", name, err)
        cfg = None
    mean = getattr(cfg, "mean", None)
    std = getattr(cfg, "std", None)
    if cfg is None or mean is None or std is None or len(mean) != 3 or len(std) != 3:
        logger.info("no pretrained config for backbone %r; using ImageNet mean/std", name)
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """What a trained network expects of an image: its eval transform's settings.

    Carried by every loaded model (``model.preprocessing``, as timm's ``pretrained_cfg``), so
    no consumer (cam, the web page, export) guesses sizes or normalisation.

    Attributes:
        image_size: (h, w) of the network's input, after the centre crop.
        resize_size: (h, w) the image is resized to before the crop; None for the paper's
            ratio (:func:`default_resize_size`).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
    """

    image_size: tuple[int, int]
    resize_size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocessing:
        """From the plain ``transform`` values a checkpoint stores (see ``transform_config``).

        Raises:
            ValueError: A size or the normalisation is malformed.
        """
        resize = config.get("resize_size")
        mean, std = check_normalization(config.get("mean", IMAGENET_DEFAULT_MEAN),
                                        config.get("std", IMAGENET_DEFAULT_STD))
        return cls(
            image_size=to_hw(config.get("image_size", DEFAULT_IMAGE_SIZE), "image_size"),
            resize_size=None if resize is None else to_hw(resize, "resize_size"),
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
        )

    def as_config(self) -> dict[str, Any]:
        """Plain values: ``build_transforms(train=False, **config)`` rebuilds the transform."""
        return {
            "image_size": list(self.image_size),
            "resize_size": None if self.resize_size is None else list(self.resize_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def transform(self) -> Callable:
        """The eval transform: PIL RGB image -> normalised (3, H, W) tensor."""
        return build_transforms(train=False, **self.as_config())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of one input image."""
        return (3, *self.image_size)
