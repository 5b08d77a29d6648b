"""The memory format and precision that train a backbone fastest on this CPU."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crasmra.cpu.cores import read_file

__all__ = [
    "BF16_FLAGS",
    "FAMILY_FORMATS",
    "ComputePlan",
    "FamilyFormat",
    "cpu_autocast",
    "cpu_bf16_support",
    "cpu_flags",
    "cpu_flags_summary",
    "plan_compute",
]

#: /proc/cpuinfo flags of a CPU that computes bf16 natively (oneDNN's bf16 kernels).
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read.

    Read once per file and process: the plan is consulted per batch by ``predict`` and
    ``report``, and a CPU's flags do not change while it runs.
    """
    return _flags_in(str(cpuinfo))


@functools.lru_cache(maxsize=8)
def _flags_in(cpuinfo: str) -> frozenset[str]:
    text = read_file(Path(cpuinfo)) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_support(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16).

    Args:
        flags: The CPU's flags; None reads them (:func:`cpu_flags`).
    """
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def cpu_flags_summary(flags: frozenset[str] | None = None) -> str:
    """The flags that decide the plan, e.g. ``"avx2 avx512f avx512_bf16 amx_bf16"``."""
    flags = cpu_flags() if flags is None else flags
    wanted = ("avx2", "avx512f", "avx512_vnni", *BF16_FLAGS, "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


@dataclass(frozen=True)
class FamilyFormat:
    """What pays for one backbone family on a CPU (measured, BENCHMARKS.md).

    Attributes:
        name: The family, as the log names it.
        prefixes: timm model-name prefixes of the family.
        channels_last_fp32: Channels-last is faster than NCHW in fp32 (any x86 CPU).
        bf16: bf16 autocast is faster than fp32 where the CPU has native bf16.
        channels_last_bf16: Channels-last is faster than NCHW under bf16 autocast.
    """

    name: str
    prefixes: tuple[str, ...]
    channels_last_fp32: bool
    bf16: bool
    channels_last_bf16: bool


#: Per family, from ``benchmarks/cpu_formats.py`` on an AVX2 CPU (AMD EPYC) and on an
#: AVX-512/AMX Xeon (BENCHMARKS.md). The first family whose prefix matches decides; a backbone
#: of no listed family keeps NCHW fp32. ConvNeXt: channels-last 0.96-1.03x on the EPYC.
FAMILY_FORMATS: tuple[FamilyFormat, ...] = (
    FamilyFormat(
        "EfficientNet/MobileNet (depthwise)",
        ("tf_efficientnet", "efficientnet", "mobilenet", "tf_mobilenet", "mnasnet", "lcnet",
         "fbnet", "ghostnet", "tinynet", "mixnet", "tf_mixnet"),
        channels_last_fp32=True, bf16=False, channels_last_bf16=True,
    ),
    # Bottleneck ResNets gain from channels-last in fp32 (resnet50: 1.09-1.12x on an AVX2 EPYC,
    # 1.27x on an AVX-512 Xeon); the small basic-block ones do not reliably (resnet10t at the
    # demo's 56 px: 1.05-1.17x on the EPYC, 0.93x on the Xeon).
    FamilyFormat(
        "ResNet (bottleneck)",
        ("resnet50", "resnet101", "resnet152", "resnet200", "resnext", "wide_resnet",
         "seresnet50", "seresnet101", "seresnet152", "seresnext", "resnetrs", "ecaresnet50",
         "ecaresnet101", "resnest", "res2net"),
        channels_last_fp32=True, bf16=True, channels_last_bf16=True,
    ),
    FamilyFormat(
        "ResNet",
        ("resnet", "seresnet", "ecaresnet", "skresnet"),
        channels_last_fp32=False, bf16=True, channels_last_bf16=True,
    ),
    FamilyFormat(
        "DenseNet", ("densenet",),
        channels_last_fp32=False, bf16=True, channels_last_bf16=True,
    ),
    FamilyFormat(
        "ConvNeXt", ("convnext",),
        channels_last_fp32=False, bf16=True, channels_last_bf16=True,
    ),
)


def _family(backbone: str) -> FamilyFormat | None:
    name = backbone.split(".", 1)[0].lower()
    matches = [f for f in FAMILY_FORMATS for p in f.prefixes if name.startswith(p)]
    return matches[0] if matches else None


@dataclass(frozen=True)
class ComputePlan:
    """Memory format and precision for one backbone on this CPU.

    Attributes:
        backbone: The timm model name.
        channels_last: Run the network in channels-last memory format.
        precision: Lightning precision, ``"32-true"`` or ``"bf16-mixed"``.
        family: The family row that decided it (None: not listed, NCHW fp32).
        native_bf16: Whether the CPU computes bf16 natively.
        flags: :func:`cpu_flags_summary` of the CPU.
    """

    backbone: str
    channels_last: bool
    precision: str
    family: str | None
    native_bf16: bool
    flags: str

    @property
    def bf16(self) -> bool:
        """Whether the plan computes under bf16 autocast."""
        return self.precision.startswith("bf16")

    def describe_choice(self) -> str:
        """E.g. ``"channels_last fp32"``."""
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{layout} {'bf16' if self.bf16 else 'fp32'}"

    def describe(self, channels_last: bool | None = None, precision: str | None = None) -> str:
        """One line for the log; ``channels_last``/``precision`` as actually set, if given."""
        chosen_cl = self.channels_last if channels_last is None else channels_last
        chosen_precision = self.precision if precision is None else str(precision)
        overridden = (chosen_cl, chosen_precision) != (self.channels_last, self.precision)
        family = self.family or "no measured family"
        cpu = f"{'native' if self.native_bf16 else 'no native'} bf16 ({self.flags})"
        how = "set on the command line or in the config" if overridden else "chosen"
        return (
            f"CPU compute: {'channels_last' if chosen_cl else 'NCHW'}, precision "
            f"{chosen_precision}, {how} for {self.backbone} ({family}; CPU with {cpu}); change "
            "with --model.runtime.channels_last and --trainer.precision"
        )


def plan_compute(backbone: str, flags: frozenset[str] | None = None) -> ComputePlan:
    """The fastest measured memory format and precision for ``backbone`` on this CPU.

    Args:
        backbone: timm model name (a pretrained tag after a dot is ignored).
        flags: The CPU's flags; None reads them (:func:`cpu_flags`).

    Returns:
        bf16 autocast only where the family gains from it and the CPU has native bf16; the
        memory format that is fastest in the chosen precision. A backbone of no listed family
        keeps NCHW fp32 (the behaviour of a plain PyTorch run).
    """
    flags = cpu_flags() if flags is None else flags
    native = cpu_bf16_support(flags)
    family = _family(backbone)
    if family is None:
        channels_last, bf16 = False, False
    else:
        bf16 = native and family.bf16
        channels_last = family.channels_last_bf16 if bf16 else family.channels_last_fp32
    return ComputePlan(
        backbone=backbone,
        channels_last=channels_last,
        precision="bf16-mixed" if bf16 else "32-true",
        family=family.name if family else None,
        native_bf16=native,
        flags=cpu_flags_summary(flags),
    )


def cpu_autocast(enabled: bool) -> Any:
    """bf16 autocast on the CPU when ``enabled`` (as Lightning's ``bf16-mixed``), else a no-op."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
