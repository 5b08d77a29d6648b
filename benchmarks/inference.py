"""Inference cost of the CRA-SMRA network (no SMRAM) vs the plain timm classifier.

Latency: one image per call (batch 1). Throughput: images/s at batch 32 (``--throughput-batch``).
Both under ``torch.inference_mode`` in eval mode; the CRA-SMRA network's output includes the
paper's prediction (the mean of the four heads' softmaxes), so that is computed too.

Usage::

    python benchmarks/inference.py --backbone resnet50 --size 224
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import timm
import torch
from torch import Tensor, nn

from benchlib import (
    Candidate,
    add_model_timing_args,
    autocast,
    count_flops,
    count_params,
    markdown_table,
    pick_device,
    time_alternating,
)
from crasmra.backbones import timm_size_options
from crasmra.model import create_model

INFER_KINDS: tuple[str, ...] = ("plain", "cra-smra")


@dataclass
class InferConfig:
    """What defines an inference comparison."""

    backbone: str = "resnet50"
    num_classes: int = 200
    size: int = 224
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False


def build_network(kind: str, cfg: InferConfig) -> nn.Module:
    """The eval-mode network of ``kind``: ``plain`` or a CRA-SMRA variant (same graph for all
    variants with attention, so ``cra-smra`` stands for ``cram`` too)."""
    if kind == "plain":
        net = timm.create_model(cfg.backbone, num_classes=cfg.num_classes,
                                **timm_size_options(cfg.backbone, cfg.size))
    else:
        net = create_model(cfg.backbone, cfg.num_classes, variant=kind, img_size=cfg.size)
    net = net.to(pick_device(cfg.device)).eval()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def predict_fn(net: nn.Module, kind: str, images: Tensor, cfg: InferConfig):
    """A callable that returns the class probabilities the user would get."""
    model = torch.compile(net) if cfg.compile else net
    device = pick_device(cfg.device)

    def run() -> Tensor:
        with torch.inference_mode(), autocast(device, cfg.dtype):
            out = model(images)
            return out.softmax(dim=-1) if kind == "plain" else out.probs

    return run


def build_candidates(cfg: InferConfig, kinds: tuple[str, ...] = INFER_KINDS,
                     throughput_batch: int = 32) -> list[Candidate]:
    """A latency (batch 1) and a throughput (batch ``throughput_batch``) candidate per kind."""
    device = pick_device(cfg.device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    out = []
    for kind in kinds:
        net = build_network(kind, cfg)
        one = torch.randn(1, 3, cfg.size, cfg.size, device=device).contiguous(memory_format=fmt)
        flops = count_flops(lambda net=net, one=one: net(one))
        params = count_params(net)
        for batch in (1, throughput_batch):
            images = torch.randn(batch, 3, cfg.size, cfg.size, device=device)
            images = images.contiguous(memory_format=fmt)
            out.append(Candidate(f"infer {kind} b{batch}", predict_fn(net, kind, images, cfg),
                                 items=batch, flops=flops * batch,
                                 extra={"kind": kind, "batch": batch, "params": params}))
    return out


def infer_table(cands: list[Candidate], peak_tflops: float | None = None) -> str:
    """Markdown table: params, GFLOPs/image, latency, throughput and ratios vs plain."""
    by = {(c.extra["kind"], c.extra["batch"]): c for c in cands}
    kinds = list(dict.fromkeys(c.extra["kind"] for c in cands))
    big = max(c.extra["batch"] for c in cands)
    header = ["network", "params (M)", "GFLOPs/img", "FLOPs vs plain", "latency b1 (ms)",
              "latency vs plain", f"img/s b{big}", "throughput vs plain"]
    if peak_tflops:
        header.append(f"MFU b{big}")
    rows = []
    p1, pb = by.get(("plain", 1)), by.get(("plain", big))
    for kind in kinds:
        c1, cb = by[(kind, 1)], by[(kind, big)]
        row = [kind, f"{c1.extra['params'] / 1e6:.2f}", f"{c1.flops / 1e9:.2f}",
               f"{c1.flops / p1.flops:.3f}x" if p1 else "-", f"{c1.median * 1e3:.1f}",
               f"{c1.median / p1.median:.2f}x" if p1 else "-", f"{big / cb.median:.1f}",
               f"{pb.median / cb.median:.2f}x" if pb else "-"]
        if peak_tflops:
            row.append(f"{cb.flops / cb.median / 1e12 / peak_tflops:.1%}")
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_timing_args(parser, warmup=2, iters=3)
    parser.add_argument("--throughput-batch", type=int, default=32)
    args = parser.parse_args(argv)
    cfg = InferConfig(args.backbone, args.num_classes, args.size, str(pick_device(args.device)),
                      args.dtype, args.channels_last, args.compile)
    cands = build_candidates(cfg, throughput_batch=args.throughput_batch)
    time_alternating(cands, pick_device(cfg.device), warmup=args.warmup, iters=args.iters,
                     rounds=args.rounds, log=print)
    print(infer_table(cands, args.peak_tflops))


if __name__ == "__main__":
    main()
