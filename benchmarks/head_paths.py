"""What the paper's heads keep of a pretrained backbone before any training step.

CRA-SMRA's heads do not read the backbone's features directly: each stage's map goes through
CRAM (or the identity), a projection ``Conv_layer`` (1x1 conv, BN, ReLU), global pooling and
an MLP (BN, linear, BN, ELU) before the classifier. With random weights in that path, an
imprinted classifier (``--model.finetune.head_init imprint``) reads a random projection of what the
backbone knows. This script measures, on held-out training photos (never the test split):

- ``paths``: each head's accuracy right after imprinting (no training step), for the
  projection and hidden layers at PyTorch's initialisation (``random``) or at
  :func:`crasmra.finetune.init_head_paths` (``identity``), with max or average pooling; beside
  it, the nearest class mean of the stage's own average-pooled map.
- ``suppression``: what CRAM's mask does to the backbone at initialisation: the mean number of
  channels it suppresses per image in each attended stage but the last, and the nearest class
  mean of the last stage's map when the earlier stages' outputs reach it suppressed, for a few
  (omega, delta).

Example (cub100 of ../shared/realdata, one photo per class, 10% of the training split held
out as in ``--data.val_fraction 0.1``)::

    python benchmarks/head_paths.py --dataset cub \\
        --root ../shared/realdata/cub100/CUB_200_2011 --backbone tf_efficientnet_lite0 \\
        --pretrained ../shared/realdata/weights/tf_efficientnet_lite0.imagenet.safetensors \\
        --train-per-class 1 --json head_paths-k1.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from crasmra.cpu import configure_cpu
from crasmra.data import build_transforms, create_dataset, normalization_for_backbone
from crasmra.finetune import imprint_classifiers, init_head_paths
from crasmra.model import CRASMRANet, create_model

SUPPRESSION_SETTINGS = ((1.0, 0.9), (0.5, 0.9), (0.5, 0.97), (0.5, 1.0))


def nearest_class_mean(
    train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, num_classes: int
) -> float:
    """Top-1 of the cosine nearest class mean (L2-normalised features, as the anchors)."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    means = torch.zeros(num_classes, train.shape[1]).index_add_(0, train_y, train)
    return float(((test @ F.normalize(means, dim=1).T).argmax(1) == test_y).float().mean())


def _batches(loader: DataLoader) -> Callable[[], Iterable[tuple[Tensor, Tensor]]]:
    return lambda: iter(loader)


@torch.inference_mode()
def head_accuracy(net: CRASMRANet, loader: DataLoader) -> dict[str, float]:
    """Top-1 of every head on ``loader`` (eval mode)."""
    net.eval()
    correct = torch.zeros(len(net.head_names))
    seen = 0
    for images, target in loader:
        out = net(images)
        logits = [*out.stage_logits, out.concat_logits]
        correct += torch.tensor([float((lg.argmax(1) == target).sum()) for lg in logits])
        seen += len(target)
    return {name: float(c) / max(seen, 1) for name, c in zip(net.head_names, correct, strict=True)}


@torch.inference_mode()
def stage_features(
    net: CRASMRANet, loader: DataLoader, suppress: bool
) -> tuple[list[Tensor], Tensor, list[float]]:
    """Average-pooled map of every attended stage; with ``suppress``, CRAM's x_s flows on.

    Returns the (N, C) features per stage, the labels and, per stage, the mean number of
    channels CRAM's mask suppresses per image (0 without ``suppress``).
    """
    net.eval()
    feats: list[list[Tensor]] = [[] for _ in net.attention]
    suppressed = [0.0 for _ in net.attention]
    labels, seen = [], 0
    for images, target in loader:
        state = images
        for i, attention in enumerate(net.attention):
            state = net.backbone.forward_segment(i, state)
            x = net.backbone.stage_map(state)  # (B, C, H, W), whatever the backbone's layout
            feats[i].append(x.mean(dim=(2, 3)))
            if suppress and i < len(net.attention) - 1:
                importance = attention.channel_importance(x).flatten(1)  # (B, C)
                probs = importance.softmax(dim=1)
                mask = probs >= attention.delta * probs.amax(dim=1, keepdim=True)
                suppressed[i] += float(mask.sum())
                _, x_s = attention(x)
                state = net.backbone.with_map(state, x_s)
        labels.append(target)
        seen += len(target)
    return [torch.cat(f) for f in feats], torch.cat(labels), [s / max(seen, 1) for s in suppressed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", required=True, help="local timm weights file")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    configure_cpu("cpu", 0, args.threads)
    mean, std = normalization_for_backbone(args.backbone)
    transform = build_transforms(
        False, image_size=args.image_size, resize_size=args.resize_size, mean=mean, std=std
    )
    common = {"transform": transform, "val_fraction": args.val_fraction,
              "split_seed": args.split_seed}
    train = create_dataset(args.dataset, args.root, "train", train_per_class=args.train_per_class,
                           subset_seed=args.subset_seed, **common)
    val = create_dataset(args.dataset, args.root, "val", **common)
    num_classes = len(train.classes)
    train_loader = DataLoader(train, batch_size=args.batch_size)
    val_loader = DataLoader(val, batch_size=args.batch_size)

    def build(variant: str, **hparams: Any) -> CRASMRANet:
        torch.manual_seed(args.seed)
        return create_model(args.backbone, num_classes, variant, pretrained=args.pretrained,
                            final_features=True, **hparams)

    results: dict[str, Any] = {"paths": [], "suppression": []}
    net = build("baseline")
    train_feats, train_y, _ = stage_features(net, train_loader, suppress=False)
    val_feats, val_y, _ = stage_features(net, val_loader, suppress=False)
    raw = {
        name: nearest_class_mean(tr, train_y, va, val_y, num_classes)
        for name, tr, va in zip(net.stage_names, train_feats, val_feats, strict=True)
    }
    for path in ("random", "identity"):
        for pool in ("max", "avg"):
            net = build("baseline", head_pool=pool)
            if path == "identity":
                init_head_paths(net, _batches(train_loader), num_classes)
            imprint_classifiers(net, _batches(train_loader), num_classes,
                                calibrate=path == "random")
            results["paths"].append(
                {"path": path, "pool": pool, "heads": head_accuracy(net, val_loader)}
            )
    for omega, delta in SUPPRESSION_SETTINGS:
        net = build("cram", omega=omega, delta=delta)
        train_feats, train_y, _ = stage_features(net, train_loader, suppress=True)
        val_feats, val_y, counts = stage_features(net, val_loader, suppress=True)
        results["suppression"].append({
            "omega": omega, "delta": delta,
            "suppressed_channels": dict(zip(net.stage_names[:-1], counts[:-1], strict=True)),
            "last_stage_ncm": nearest_class_mean(
                train_feats[-1], train_y, val_feats[-1], val_y, num_classes
            ),
        })

    subset = (f", {args.train_per_class} per class (subset seed {args.subset_seed})"
              if args.train_per_class is not None else "")
    print(f"{args.backbone} on {args.dataset}: {len(train)} training photos{subset}, "
          f"{len(val)} held-out training photos (val_fraction {args.val_fraction}); no "
          "training step\n")
    names = [*build("baseline").head_names]
    print("| head path | pooling | " + " | ".join(names) + " |")
    print("| --- | --- |" + " ---: |" * len(names))
    print("| the stage's own map, average-pooled (nearest class mean) | - | "
          + " | ".join(f"{100 * raw[n]:.1f}" if n in raw else "-" for n in names) + " |")
    for row in results["paths"]:
        print(f"| {row['path']} | {row['pool']} | "
              + " | ".join(f"{100 * row['heads'][n]:.1f}" for n in names) + " |")
    print("\n| omega | delta | channels suppressed per image | last stage's nearest class mean |")
    print("| ---: | ---: | --- | ---: |")
    for row in results["suppression"]:
        counts = ", ".join(f"{k} {v:.1f}" for k, v in row["suppressed_channels"].items())
        print(f"| {row['omega']} | {row['delta']} | {counts} | "
              f"{100 * row['last_stage_ncm']:.1f} |")
    results.update(
        stage_ncm=raw, settings=vars(args), train_images=len(train), val_images=len(val),
        seconds=round(time.perf_counter() - start, 1), python=platform.python_version(),
        torch=torch.__version__,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nWrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
