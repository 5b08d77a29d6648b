"""Anchors of a pretrained backbone's features: nearest class mean and a linear probe.

What a fine-tuning recipe must not lose, measured on the frozen backbone. On the same
extracted features, three classifiers:

- ``ncm``: each test image goes to the class whose mean (L2-normalised) training feature is
  closest in cosine similarity; no training at all.
- ``ncm_centered``: the same after subtracting the mean training feature from every feature
  (SimpleShot's CL2N: centre, then L2-normalise).
- ``linear_probe``: multinomial logistic regression on the L2-normalised features, fitted with
  full-batch L-BFGS from zero weights (so the fit is deterministic). Its L2 weight decay
  (``loss = mean cross-entropy + decay / 2 * ||W||^2``; the bias is not decayed) is chosen
  from ``--decays`` on a seeded stratified hold-out of the training features only (a share
  ``--holdout-fraction`` of each class; the best hold-out accuracy, ties broken by the lower
  hold-out cross-entropy), then the probe is refitted on all training features. The test
  features never reach the selection. When a class has a single training photo no stratified
  hold-out exists: the probe then uses the fixed decay ``--fallback-decay`` (default 1e-3) and
  the output says so.

Features are the backbone's pooled pre-logits (timm's ``forward_head(pre_logits=True)``,
e.g. 1280-d for EfficientNet-Lite0) and the globally average-pooled output of each of the last
three feature stages (the maps CRA-SMRA's heads read).

``--train-per-class N --subset-seed S`` take the training photos of the seeded few-shot subset
that ``--data.train_per_class N --data.subset_seed S`` trains on, so each subset's anchors
come from the photos the recipes see.

Example (the real CUB photos of ``../shared/realdata``)::

    python benchmarks/ncm_probe.py --dataset cub \\
        --root ../shared/realdata/cub10/CUB_200_2011 --backbone tf_efficientnet_lite0 \\
        --pretrained ../shared/realdata/weights/tf_efficientnet_lite0.imagenet.safetensors \\
        --image-size 224 --resize-size 256 --json anchors.json

It prints a markdown table (feature x method, top-1 %) and, with ``--json FILE``, writes every
number and the settings (``--json`` alone prints them as one JSON line instead). The JSON keeps
the keys of the NCM-only version at its top level (``prelogits``, ``stage3``...: the ``ncm``
accuracy as a fraction; ``train_images``; ``test_images`` or ``val_images``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from crasmra.backbones import load_weights_file
from crasmra.cpu import configure_cpu
from crasmra.data import build_transforms, create_dataset, normalization_for_backbone
from crasmra.finetune.probe import (
    DECAY_GRID,
    FALLBACK_DECAY,
    HOLDOUT_FRACTION,
    PROBE_MAX_ITER,
    DecayChoice,
    fit_logreg,
    select_decay,
)

METHODS = ("ncm", "ncm_centered", "linear_probe")


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


# ---------------------------------------------------------------------------------------------
# nearest class mean
# ---------------------------------------------------------------------------------------------
def ncm_accuracy(
    train: torch.Tensor,
    train_y: torch.Tensor,
    test: torch.Tensor,
    test_y: torch.Tensor,
    *,
    center: bool = False,
) -> float:
    """Top-1 accuracy of the nearest class mean (cosine) classifier.

    Args:
        train, train_y: Training features ``(N, D)`` and labels ``(N,)``.
        test, test_y: Test features ``(M, D)`` and labels ``(M,)``.
        center: Subtract the mean training feature from both first (SimpleShot's CL2N).
    """
    train, test = train.float(), test.float()
    if center:
        mean = train.mean(dim=0, keepdim=True)
        train, test = train - mean, test - mean
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    means = torch.zeros(classes, train.shape[1]).index_add_(0, train_y, train)
    means = F.normalize(means, dim=1)  # (K, D)
    pred = (test @ means.T).argmax(dim=1)
    return float((pred == test_y).float().mean())


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of the linear probe and its decay choice."""

    accuracy: float
    choice: DecayChoice
    iterations: int = 0


def linear_probe(
    train: torch.Tensor,
    train_y: torch.Tensor,
    test: torch.Tensor,
    test_y: torch.Tensor,
    *,
    decays: Sequence[float] = DECAY_GRID,
    holdout_fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
    fallback_decay: float = FALLBACK_DECAY,
    max_iter: int = PROBE_MAX_ITER,
) -> ProbeResult:
    """Linear probe: decay chosen on the training features (:func:`select_decay`), refitted
    on all of them, scored on the test features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    choice = select_decay(
        train,
        train_y,
        num_classes,
        decays,
        holdout_fraction=holdout_fraction,
        seed=seed,
        fallback_decay=fallback_decay,
        max_iter=max_iter,
    )
    probe = fit_logreg(train, train_y, num_classes, choice.decay, max_iter=max_iter)
    return ProbeResult(probe.accuracy(test, test_y), choice, probe.iterations)


def anchors(
    train: Mapping[str, torch.Tensor],
    train_y: torch.Tensor,
    test: Mapping[str, torch.Tensor],
    test_y: torch.Tensor,
    **probe_options: Any,
) -> tuple[dict[str, dict[str, float]], dict[str, ProbeResult]]:
    """Every method on every feature: ``({feature: {method: accuracy}}, {feature: probe})``."""
    accuracy: dict[str, dict[str, float]] = {}
    probes: dict[str, ProbeResult] = {}
    for key in train:
        probe = linear_probe(train[key], train_y, test[key], test_y, **probe_options)
        accuracy[key] = {
            "ncm": ncm_accuracy(train[key], train_y, test[key], test_y),
            "ncm_centered": ncm_accuracy(train[key], train_y, test[key], test_y, center=True),
            "linear_probe": probe.accuracy,
        }
        probes[key] = probe
    return accuracy, probes


def markdown(
    accuracy: Mapping[str, Mapping[str, float]],
    choices: Mapping[str, DecayChoice],
    dims: Mapping[str, int],
) -> str:
    """The feature x method table (top-1 %), with the probe's decay."""
    header = ["feature", "dim", *METHODS, "probe decay"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---", "---:", *("---:" for _ in METHODS), "---"]) + " |",
    ]
    for key, row in accuracy.items():
        c = choices[key]
        decay = f"{c.decay:g} ({'hold-out' if c.selection == 'holdout' else 'fixed'})"
        cells = [key, str(dims[key]), *(f"{100 * row[m]:.1f}%" for m in METHODS), decay]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]


def _decay_key(decay: float) -> str:
    return f"{decay:g}"


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
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="class means and probe from this many seeded training photos per class "
        "(as --data.train_per_class; default: the whole training split)",
    )
    parser.add_argument("--subset-seed", type=int, default=0,
                        help="seed of that subset (as --data.subset_seed)")
    parser.add_argument("--decays", type=float, nargs="+", default=list(DECAY_GRID),
                        help="weight decays the probe chooses from (default: %(default)s)")
    parser.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION,
                        help="share of each class's training features the decay is chosen on")
    parser.add_argument("--fallback-decay", type=float, default=FALLBACK_DECAY,
                        help="the decay when a class has a single training photo")
    parser.add_argument("--probe-seed", type=int, default=0, help="seed of the hold-out")
    parser.add_argument("--probe-max-iter", type=int, default=PROBE_MAX_ITER)
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write every number and the settings to FILE as JSON (no FILE: print them as "
        "one JSON line instead of the table)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    plan = configure_cpu("cpu", 0, args.threads)
    model = timm.create_model(args.backbone, pretrained=False)
    model.load_state_dict(load_weights_file(args.pretrained))
    model.eval()
    mean, std = normalization_for_backbone(args.backbone)
    # The evaluation transform for every split: the anchors are a property of the backbone.
    transform = build_transforms(
        False, image_size=args.image_size, resize_size=args.resize_size, mean=mean, std=std
    )
    # With --val-fraction the anchors come from the rest of the training split and the
    # held-out part is classified (the split the recipes tune on); otherwise the test split.
    held_out = "val" if args.val_fraction > 0 else "test"
    datasets = {
        split: create_dataset(
            args.dataset,
            args.root,
            split,
            transform=transform,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            train_per_class=args.train_per_class,
            subset_seed=args.subset_seed,
        )
        for split in ("train", held_out)
    }
    splits = {
        split: _features(model, DataLoader(ds, batch_size=args.batch_size))
        for split, ds in datasets.items()
    }
    extracted = time.perf_counter()
    (train, train_y), (test, test_y) = splits["train"], splits[held_out]
    accuracy, probes = anchors(
        train,
        train_y,
        test,
        test_y,
        decays=args.decays,
        holdout_fraction=args.holdout_fraction,
        seed=args.probe_seed,
        fallback_decay=args.fallback_decay,
        max_iter=args.probe_max_iter,
    )
    done = time.perf_counter()
    choices = {key: probe.choice for key, probe in probes.items()}
    counts = torch.bincount(train_y)
    counts = counts[counts > 0]
    dims = {key: int(value.shape[1]) for key, value in train.items()}

    # The NCM-only version's keys first, unchanged.
    result: dict[str, Any] = {key: row["ncm"] for key, row in accuracy.items()}
    result["train_images"], result[f"{held_out}_images"] = len(train_y), len(test_y)
    result["evaluated_split"] = held_out
    result["accuracy"] = accuracy
    result["linear_probe"] = {
        key: {
            "decay": c.decay,
            "selection": c.selection,
            "reason": c.reason,
            "holdout_images": c.holdout_images,
            "lbfgs_iterations": probes[key].iterations,
            "holdout_accuracy": (
                {_decay_key(d): v for d, v in c.holdout_accuracy.items()}
                if c.holdout_accuracy is not None
                else None
            ),
            "holdout_loss": (
                {_decay_key(d): v for d, v in c.holdout_loss.items()}
                if c.holdout_loss is not None
                else None
            ),
        }
        for key, c in choices.items()
    }
    result["feature_dims"] = dims
    result["settings"] = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "classes": len(datasets["train"].classes),
        "train_photos_per_class": {"min": int(counts.min()), "max": int(counts.max())},
        "train_files_sha256_16": _digest([p for p, _ in getattr(datasets["train"], "samples",
                                                                  [])]),
        "methods": list(METHODS),
        "probe": "multinomial logistic regression on L2-normalised features, full-batch "
        "L-BFGS from zeros in float64, loss = mean CE + decay/2 ||W||^2 (bias not decayed)",
        "threads": plan.threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "extract_s": round(extracted - start, 1),
        "probe_s": round(done - extracted, 1),
    }
    for value in accuracy.values():
        assert all(math.isfinite(v) for v in value.values())

    if args.json == "-":
        print(json.dumps(result))
        return 0
    subset = (
        f", {args.train_per_class} per class (subset seed {args.subset_seed})"
        if args.train_per_class is not None
        else ""
    )
    print(
        f"{args.backbone} on {args.dataset}: {len(train_y)} training photos{subset}, "
        f"{len(test_y)} {held_out} photos, {len(datasets['train'].classes)} classes; "
        "top-1 on the " + held_out + " split"
    )
    print()
    print(markdown(accuracy, choices, dims))
    fixed = {c.reason for c in choices.values() if c.selection == "fixed"}
    for reason in sorted(fixed):
        print(f"\nlinear_probe: {reason}.")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
