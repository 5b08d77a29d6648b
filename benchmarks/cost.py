"""Parameters and FLOPs of each CRA-SMRA variant's inference network vs the plain classifier.

Prints a markdown table. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` for one
image (it counts matmuls and convolutions, 2 FLOPs per multiply-add; element-wise ops such as
CRAM's channel products and masks are not counted, they are negligible). SMRAM is training-only
and not part of the inference network, so it is not counted; its own cost is shown on a
separate line for reference.

The reference is the plain timm classifier of the same backbone at the same size: for a
Transformer (Swin, ViT) the plain Transformer, built for ``--size`` as crasmra builds it.
``--backbone`` takes several names, comma-separated: one table each.

Usage::

    python benchmarks/cost.py --backbone resnet50 --size 448 --num-classes 200
    python benchmarks/cost.py --backbone swin_base_patch4_window12_384,vit_base_patch16_224 \
        --size 448
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from crasmra.backbones import timm_size_options
from crasmra.losses import trains_with_smram
from crasmra.model import PAPER_VARIANTS, create_model, create_smram


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (run under no_grad)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50",
                        help="timm name(s), comma-separated: CNNs, Swin, ViT")
    parser.add_argument("--size", type=int, default=448, help="input height and width")
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--conv-layer", default="light", choices=("light", "pmg"))
    parser.add_argument("--head-channels", type=int, default=512, help="C_a")
    args = parser.parse_args(argv)
    for backbone in args.backbone.split(","):
        print_table(backbone, args)
        print()


def print_table(backbone: str, args: argparse.Namespace) -> None:
    """The parameters and FLOPs of every paper variant of ``backbone`` against its plain model."""
    x = torch.randn(1, 3, args.size, args.size)
    options = timm_size_options(backbone, args.size)
    plain = timm.create_model(backbone, num_classes=args.num_classes, **options).eval()
    base_flops, base_params = count_flops(lambda: plain(x)), count_params(plain)

    rows = [("plain timm classifier", base_params, base_flops)]
    smram_row = None
    for variant in PAPER_VARIANTS:
        net = create_model(
            backbone,
            args.num_classes,
            variant=variant,
            conv_layer=args.conv_layer,
            head_channels=args.head_channels,
            img_size=args.size,
        ).eval()
        rows.append((variant, count_params(net), count_flops(lambda net=net: net(x))))
        if trains_with_smram(variant):
            smram = create_smram(net).eval()
            with torch.no_grad():
                features = net(x).features
            smram_row = (count_params(smram), count_flops(lambda s=smram, f=features: s(f)))

    print(
        f"{backbone} @ {args.size}x{args.size}, K={args.num_classes}, "
        f"conv_layer={args.conv_layer}, C_a={args.head_channels}\n"
    )
    print("| network | params (M) | GFLOPs | FLOPs vs plain |")
    print("| --- | ---: | ---: | ---: |")
    for name, params, flops in rows:
        print(f"| {name} | {params / 1e6:.2f} | {flops / 1e9:.2f} | {flops / base_flops:.3f}x |")
    if smram_row is not None:
        params, flops = smram_row
        print(
            f"| (SMRAM, training only) | {params / 1e6:.4f} | {flops / 1e9:.4f} | "
            f"{flops / base_flops:.4f}x |"
        )


if __name__ == "__main__":
    main()
