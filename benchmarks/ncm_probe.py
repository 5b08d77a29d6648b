"""Nearest-class-mean accuracy of a pretrained backbone's features, with no training at all.

What a fine-tuning recipe must not lose: each test image goes to the class whose mean
(L2-normalised) training feature is closest in cosine similarity. Features are the backbone's
pooled pre-logits (timm's ``forward_head(pre_logits=True)``, e.g. 1280-d for EfficientNet-Lite0)
and, for comparison, the globally average-pooled output of each of the last three feature
stages (the maps CRA-SMRA's heads read).

Example (the real CUB photos of ``../shared/realdata``)::

    python benchmarks/ncm_probe.py --dataset cub \\
        --root ../shared/realdata/cub10/CUB_200_2011 --backbone tf_efficientnet_lite0 \\
        --pretrained ../shared/realdata/weights/tf_efficientnet_lite0.imagenet.safetensors \\
        --image-size 224 --resize-size 256
"""

from __future__ import annotations

import argparse
import json
import sys

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from crasmra.backbones import load_weights_file
from crasmra.cpu import configure_cpu
from crasmra.data import build_transforms, create_dataset, normalization_for_backbone


def _features(
    model: torch.nn.Module, loader: DataLoader
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled pre-logits and pooled last-three-stage features of every image, with labels."""
    taps = {i["module"]: f"stage{n + 1}" for n, i in enumerate(model.feature_info)}
    names = list(taps.values())[-3:]
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(module).register_forward_hook(
            lambda _m, _i, out, key=key: captured.__setitem__(key, out.mean(dim=(2, 3)))
        )
        for module, key in taps.items()
        if key in names
    ]
    feats: dict[str, list[torch.Tensor]] = {"prelogits": [], **{n: [] for n in names}}
    labels = []
    with torch.inference_mode():
        for images, target in loader:
            pre = model.forward_head(model.forward_features(images), pre_logits=True)
            feats["prelogits"].append(pre)
            for n in names:
                feats[n].append(captured[n])
            labels.append(target)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def ncm_accuracy(
    train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Top-1 accuracy of the nearest class mean (cosine) classifier."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    means = torch.zeros(classes, train.shape[1]).index_add_(0, train_y, train)
    means = F.normalize(means, dim=1)  # (K, D)
    pred = (test @ means.T).argmax(dim=1)
    return float((pred == test_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--pretrained", required=True, help="timm-format weights file")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="classify this held-out share of the training split instead of the "
        "test split (as --data.val_fraction)",
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    configure_cpu("cpu", 0, args.threads)
    model = timm.create_model(args.backbone, pretrained=False)
    model.load_state_dict(load_weights_file(args.pretrained))
    model.eval()
    mean, std = normalization_for_backbone(args.backbone)
    # The evaluation transform for every split: the class means are a property of the backbone.
    transform = build_transforms(
        False, image_size=args.image_size, resize_size=args.resize_size, mean=mean, std=std
    )
    # With --val-fraction the class means come from the rest of the training split and the
    # held-out part is classified (the split the recipes tune on); otherwise the test split.
    held_out = "val" if args.val_fraction > 0 else "test"
    splits = {
        split: _features(
            model,
            DataLoader(
                create_dataset(
                    args.dataset,
                    args.root,
                    split,
                    transform=transform,
                    val_fraction=args.val_fraction,
                    split_seed=args.split_seed,
                ),
                batch_size=args.batch_size,
            ),
        )
        for split in ("train", held_out)
    }
    (train, train_y), (test, test_y) = splits["train"], splits[held_out]
    result = {key: ncm_accuracy(train[key], train_y, test[key], test_y) for key in train}
    result["train_images"], result[f"{held_out}_images"] = len(train_y), len(test_y)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>12}: {value:.4f}" if isinstance(value, float) else f"{key:>12}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
