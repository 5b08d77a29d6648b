"""A validation root for a CUB subset's own classes and training photos, its held-out photos
taken from another collection of photos of the same classes.

cub10's 148 training photos hold too few to split off a useful validation set, and the nine
problems of ``class_subsets.py`` share no class with it. ``cub10`` (photos of the 2010
release of CUB-200) and ``cub100`` (photos of CUB-200-2011) are different photos of classes
001-010. This script writes a CUB root whose training split is the first root's training
split, unchanged (the photos a cub10 run trains on), and whose "test" split is the second
root's *training* photos of the same classes: a held-out set for cub10's own problem that
reads no test photo of either root. Classes are matched by official class id, and their
names must agree.

A held-out photo that nearly duplicates any photo of the first root (either split) is left
out: the two collections are independent only if they share no photo. Near duplicates are
found on 24x24 grey thumbnails, resized as the photos come (cub100's are squashed to
227x227), by their Pearson correlation (``--duplicate-correlation``, 0.9).

Example (cub10's problem, held out on cub100's training photos of its ten classes)::

    python benchmarks/held_out_release.py --train-root ../shared/realdata/cub10/CUB_200_2011 \\
        --held-out-root ../shared/realdata/cub100/CUB_200_2011 --out runs/cub10-heldout

and then any recipe on it: ``crasmra fit --config configs/cub10/cra-smra.yaml --data.root
runs/cub10-heldout/CUB_200_2011``, whose "test" is then validation data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from crasmra.data.benchmarks.common import find_base, keyed, split_flag

T = TypeVar("T")

#: The folders of the written root's ``images``: one link per source root.
TRAIN_DIR, HELD_OUT_DIR = "train-root", "held-out-root"


def _base(root: Path, flag: str) -> Path:
    base = find_base(root, ["CUB_200_2011", ""], "images.txt")
    if base is None:
        raise SystemExit(f"{root} is not a CUB-200-2011 root: no images.txt (pass {flag})")
    return base


def _read(base: Path, name: str, parse: Callable[[str], T], expected: str) -> dict[int, T]:
    """A CUB annotation file as {integer id: parsed value}, read as the CUB loader reads it."""
    return {int(k): v for k, v in keyed("cub", base / name, parse, expected).items()}


def thumbnail(path: Path, size: int = 24) -> np.ndarray:
    """The photo as a standardised ``size`` x ``size`` grey thumbnail, flattened."""
    with Image.open(path) as image:
        grey = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.float64).ravel()
    return (pixels - pixels.mean()) / (pixels.std() + 1e-6)


def write_root(
    train_root: Path, held_out_root: Path, out: Path, *, duplicate_correlation: float = 0.9
) -> dict[str, object]:
    """Write the validation root under ``out`` (``out/CUB_200_2011``); returns what it holds.

    Raises:
        SystemExit: a root is not a CUB root, the roots name a shared class differently, or
            the held-out root has no training photo of the first root's classes.
    """
    train_base = _base(train_root, "--train-root")
    held_base = _base(held_out_root, "--held-out-root")
    sources = []
    for base in (train_base, held_base):
        sources.append((
            _read(base, "images.txt", str, "an image path"),
            _read(base, "image_class_labels.txt", int, "an integer class id"),
            _read(base, "train_test_split.txt", split_flag, "1 (train) or 0 (test)"),
            _read(base, "classes.txt", str, "a class folder name"),
        ))
    (images, labels, is_train, names), (h_images, h_labels, h_is_train, h_names) = sources
    for class_id, name in names.items():
        if class_id in h_names and h_names[class_id] != name:
            raise SystemExit(f"class {class_id} is {name!r} in --train-root but "
                             f"{h_names[class_id]!r} in --held-out-root: not the same classes")
    train_ids = sorted(i for i in images if is_train[i])
    held_ids = sorted(i for i in h_images if h_is_train[i] and h_labels[i] in names)
    if not held_ids:
        raise SystemExit("--held-out-root has no training photo of --train-root's classes")

    # Every photo of the first root, test photos included, against every held-out candidate.
    known = np.stack([thumbnail(train_base / "images" / images[i]) for i in sorted(images)])
    candidates = np.stack([thumbnail(held_base / "images" / h_images[i]) for i in held_ids])
    correlation = candidates @ known.T / known.shape[1]  # (held-out, first root)
    duplicate = correlation.max(axis=1) > duplicate_correlation
    kept = [i for i, dup in zip(held_ids, duplicate, strict=True) if not dup]

    base = out / "CUB_200_2011"
    (base / "images").mkdir(parents=True, exist_ok=True)
    for name, source in ((TRAIN_DIR, train_base), (HELD_OUT_DIR, held_base)):
        link = base / "images" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((source / "images").resolve(), target_is_directory=True)
    # The training photos keep their ids (so a run trains on them in the same order as on
    # the first root); the held-out photos are numbered after the largest of those.
    offset = max(images)
    rows = [(i, f"{TRAIN_DIR}/{images[i]}", labels[i], 1) for i in train_ids]
    rows += [(offset + n + 1, f"{HELD_OUT_DIR}/{h_images[i]}", h_labels[i], 0)
             for n, i in enumerate(kept)]
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (base / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in sorted(names.items())))
    return {
        "root": str(base),
        "classes": len(names),
        "train": len(train_ids),
        "held_out": len(kept),
        "duplicates_left_out": int(duplicate.sum()),
        "highest_correlation": float(correlation.max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-root", type=Path, required=True,
                        help="the CUB root whose training split is trained on (cub10)")
    parser.add_argument("--held-out-root", type=Path, required=True,
                        help="a CUB root with other photos of the same classes (cub100); "
                             "only its training photos are read")
    parser.add_argument("--out", type=Path, required=True, help="where the root goes")
    parser.add_argument("--duplicate-correlation", type=float, default=0.9,
                        help="thumbnail correlation above which a held-out photo counts as a "
                             "copy of one of --train-root's photos and is left out")
    args = parser.parse_args(argv)
    if not -1.0 <= args.duplicate_correlation <= 1.0:
        parser.error("--duplicate-correlation must be within [-1, 1]")
    summary = write_root(args.train_root, args.held_out_root, args.out,
                         duplicate_correlation=args.duplicate_correlation)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
