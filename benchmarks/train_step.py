"""Training-step cost of CRA-SMRA's variants vs the plain timm classifier and a PMG-style step.

A step is forward, loss, backward and an SGD step (momentum 0.9, weight decay 1e-5; fused on
CUDA, foreach elsewhere, as in :meth:`crasmra.engine.CRASMRAModule.configure_optimizers`) on
one fixed synthetic batch, so only the model is timed (the input pipeline has its own
benchmark, ``input_pipeline.py``).

Step kinds:

* ``plain``: ``timm.create_model(backbone, num_classes=K)`` with cross-entropy. A Transformer
  that timm builds for one input size (Swin, ViT) is built for ``--size`` here and in every
  other kind, with the options crasmra uses (:func:`crasmra.backbones.timm_size_options`).
* ``baseline``, ``cbam``, ``cram``, ``cra-smra``: :func:`crasmra.model.create_model` with
  :class:`crasmra.losses.CRASMRALoss`; ``cra-smra`` adds :func:`crasmra.model.create_smram`'s
  diversity loss (SMRAM's parameters are optimised too).
* ``pmg``: the Progressive Multi-Granularity reference pattern (:class:`PMGNet`,
  :class:`PMGStep`): per batch three jigsaw-shuffled passes (granularities 8, 4, 2) through
  the stage-3/4/5 heads and one full pass through the concat head, each with its own forward,
  backward and optimiser step.

Usage::

    python benchmarks/train_step.py --backbone resnet50 --size 224 --batch 8
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchlib import (
    Candidate,
    add_model_timing_args,
    autocast,
    count_flops,
    markdown_table,
    peak_memory_mb,
    pick_device,
    time_alternating,
)
from crasmra.backbones import timm_size_options
from crasmra.losses import CRASMRALoss, trains_with_smram
from crasmra.model import PAPER_VARIANTS, create_model, create_smram

STEP_KINDS: tuple[str, ...] = ("plain", *PAPER_VARIANTS, "pmg")


@dataclass
class StepConfig:
    """Everything that defines a timed step (identical for every kind in one comparison)."""

    backbone: str = "resnet50"
    num_classes: int = 200
    size: int = 224
    batch: int = 8
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0


def make_optimizer(params: list[nn.Parameter], device: torch.device) -> torch.optim.SGD:
    """SGD as the engine builds it: fused kernel on CUDA, multi-tensor (foreach) elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.SGD(
        params, lr=1e-3, momentum=0.9, weight_decay=1e-5,
        fused=fused or None, foreach=None if fused else True,
    )


# ---------------------------------------------------------------------------- PMG reference
class BasicConv(nn.Sequential):
    """PMG's BasicConv: bias-free conv, BN, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def pmg_classifier(cin: int, num_classes: int, hidden: int = 512) -> nn.Sequential:
    """PMG's classifier: BN -> Linear -> BN -> ELU -> Linear."""
    return nn.Sequential(
        nn.BatchNorm1d(cin), nn.Linear(cin, hidden), nn.BatchNorm1d(hidden),
        nn.ELU(inplace=True), nn.Linear(hidden, num_classes),
    )


class PMGNet(nn.Module):
    """PMG's network (Du et al., ECCV 2020) on the last three stages of a timm CNN.

    Per stage: ``BasicConv(C_l, 512, 1) -> BasicConv(512, 1024, 3)`` -> global max pool ->
    classifier; a fourth classifier reads the concatenation (3 x 1024). As in PMG's code, every
    forward computes all four outputs; each training pass uses one of them.
    """

    def __init__(self, backbone: str, num_classes: int, feature: int = 512, width: int = 1024,
                 size: int | None = None):
        super().__init__()
        self.features = timm.create_model(backbone, features_only=True, out_indices=(-3, -2, -1),
                                          **timm_size_options(backbone, size))
        channels = self.features.feature_info.channels()
        self.blocks = nn.ModuleList(
            nn.Sequential(BasicConv(c, feature, 1), BasicConv(feature, width, 3)) for c in channels
        )
        self.classifiers = nn.ModuleList(pmg_classifier(width, num_classes) for _ in channels)
        self.concat_classifier = pmg_classifier(width * len(channels), num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        maps = self.features(x)
        pooled = [torch.amax(b(m), dim=(2, 3)) for b, m in zip(self.blocks, maps, strict=True)]
        logits = [c(p) for c, p in zip(self.classifiers, pooled, strict=True)]
        return (*logits, self.concat_classifier(torch.cat(pooled, dim=1)))


def jigsaw(
    images: Tensor,
    n: int,
    generator: torch.Generator | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """Cut every image into an n x n grid and shuffle the patches (one permutation per batch).

    PMG's ``jigsaw_generator`` does this with a Python loop of patch copies; a reshape and a
    gather give the same result in one copy.
    """
    b, c, h, w = images.shape
    ph, pw = h // n, w // n
    x = images[:, :, : ph * n, : pw * n].reshape(b, c, n, ph, n, pw)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, ph, pw)
    perm = torch.randperm(n * n, generator=generator).to(images.device)
    x = x[:, perm].reshape(b, n, n, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return x.contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------- steps
class TrainStep:
    """One training step of one kind on a fixed batch; call :meth:`step` to run it.

    :meth:`passes` yields each (forward, loss) pass of a step; :meth:`step` runs backward and
    the optimiser after each, and :meth:`forward_flops` counts the passes' forward FLOPs.
    """

    def __init__(self, kind: str, cfg: StepConfig) -> None:
        if kind not in STEP_KINDS:
            raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
        self.kind, self.cfg = kind, cfg
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.smram: nn.Module | None = None
        if kind == "plain":
            self.net: nn.Module = timm.create_model(
                cfg.backbone, num_classes=cfg.num_classes,
                **timm_size_options(cfg.backbone, cfg.size),
            )
        elif kind == "pmg":
            self.net = PMGNet(cfg.backbone, cfg.num_classes, size=cfg.size)
        else:
            self.net = create_model(cfg.backbone, cfg.num_classes, variant=kind,
                                    img_size=cfg.size)
            self.criterion = CRASMRALoss()
            if trains_with_smram(kind):
                self.smram = create_smram(self.net).to(self.device)
        self.net.to(self.device).train()
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.memory_format = fmt
        if cfg.channels_last:
            self.net.to(memory_format=fmt)
        params = list(self.net.parameters())
        if self.smram is not None:
            params += list(self.smram.parameters())
        self.optimizer = make_optimizer(params, self.device)
        # The network alone is compiled, as CRASMRAModule.configure_model does.
        self.model = torch.compile(self.net) if cfg.compile else self.net
        self.images = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=self.device)
        self.images = self.images.contiguous(memory_format=fmt)
        self.target = torch.randint(0, cfg.num_classes, (cfg.batch,), device=self.device)

    def passes(self) -> Iterator[Tensor]:
        """Yield the loss of each forward pass of one step."""
        with autocast(self.device, self.cfg.dtype):
            if self.kind == "plain":
                yield F.cross_entropy(self.model(self.images), self.target)
            elif self.kind == "pmg":
                # PMG's progressive step: granularity 8 -> stage-3 head, 4 -> stage 4, 2 ->
                # stage 5 (each weighted 1), then the whole image -> concat head (weight 2).
                for head, n in enumerate((8, 4, 2)):
                    shuffled = jigsaw(self.images, n, self.generator, self.memory_format)
                    yield F.cross_entropy(self.model(shuffled)[head], self.target)
                yield 2 * F.cross_entropy(self.model(self.images)[-1], self.target)
            else:
                output = self.model(self.images)
                div = self.smram(list(output.features))[0] if self.smram is not None else None
                yield self.criterion(output, self.target, div_loss=div)[0]

    def step(self) -> None:
        """One full training step (no host-device synchronisation)."""
        for loss in self.passes():
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def forward_flops(self) -> int:
        """Forward FLOPs of one step (all passes), counted on the eager network."""
        model, self.model = self.model, self.net
        try:
            return count_flops(lambda: list(self.passes()))
        finally:
            self.model = model

    def train_flops(self) -> int:
        """Model FLOPs of one step, counting backward as 2x forward (the usual MFU convention)."""
        return 3 * self.forward_flops()


def step_memory_mb(kind: str, cfg: StepConfig, step: TrainStep | None = None) -> float:
    """Peak memory (MB) of two training steps beyond the model's weights (see peak_memory_mb).

    On CUDA it is measured in this process, on ``step`` when given (a compiled step is then not
    compiled a second time); on CPU in a fresh interpreter.
    """
    device = pick_device(cfg.device)
    if device.type == "cuda":
        step = step if step is not None else TrainStep(kind, cfg)
        return peak_memory_mb("", "", device, in_process=step.step)
    build = (
        "import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from train_step import StepConfig, TrainStep\n"
        f"s = TrainStep({kind!r}, StepConfig(**{asdict(cfg)!r}))"
    )
    return peak_memory_mb(build, "s.step()", device)


def build_candidates(kinds: list[str], cfg: StepConfig) -> list[Candidate]:
    """One timing candidate per step kind, with its training FLOPs."""
    out = []
    for kind in kinds:
        step = TrainStep(kind, cfg)
        out.append(Candidate(f"train {kind}", step.step, items=cfg.batch,
                             flops=step.train_flops(), extra={"step": step}))
    return out


def train_table(cands: list[Candidate], peak_tflops: float | None = None,
                memory: dict[str, float] | None = None) -> str:
    """Markdown table of step times, images/s, ratios vs plain and PMG, TFLOP/s and MFU."""
    by = {c.name.removeprefix("train "): c for c in cands}
    plain = by.get("plain")
    pmg = by.get("pmg")
    header = ["step", "ms/step", "spread", "img/s", "vs plain", "vs PMG", "GFLOP/step",
              "TFLOP/s"]
    if peak_tflops:
        header.append("MFU")
    if memory:
        header.append("peak mem (MB)")
    rows = []
    for kind, c in by.items():
        achieved = c.flops / c.median / 1e12
        row = [kind, f"{c.median * 1e3:.1f}", f"{c.spread:.0%}", f"{c.items / c.median:.1f}",
               f"{c.median / plain.median:.2f}x" if plain else "-",
               f"{c.median / pmg.median:.2f}x" if pmg else "-",
               f"{c.flops / 1e9:.1f}", f"{achieved:.3f}"]
        if peak_tflops:
            row.append(f"{achieved / peak_tflops:.1%}")
        if memory:
            mem = memory.get(kind)
            row.append("-" if mem is None or math.isnan(mem) else f"{mem:.0f}")
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_timing_args(parser, warmup=1, iters=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kinds", default=",".join(STEP_KINDS))
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    args = parser.parse_args(argv)
    cfg = StepConfig(args.backbone, args.num_classes, args.size, args.batch,
                     str(pick_device(args.device)), args.dtype, args.channels_last, args.compile)
    kinds = args.kinds.split(",")
    cands = build_candidates(kinds, cfg)
    time_alternating(cands, pick_device(cfg.device), warmup=args.warmup, iters=args.iters,
                     rounds=args.rounds, log=print)
    memory = {k: step_memory_mb(k, cfg) for k in kinds} if args.memory else None
    print(train_table(cands, args.peak_tflops, memory))


if __name__ == "__main__":
    main()
