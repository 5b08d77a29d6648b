"""Validation problems cut from a CUB training split: a few classes, their photos split in two.

With 145 test photos, cub10 cannot tell a recipe change of a few points from chance, and its
training split is too small to hold out much. This script cuts several independent problems
of cub10's shape (``--classes`` classes, ``--train-per-class`` training photos each) out of
the *training* split of a larger CUB-layout root (cub100's): for each problem, a group of
classes, and for each class a seeded draw of its training photos to train on; the rest of
that class's training photos become the problem's held-out photos. ``--grouping
consecutive`` (the default) takes classes neighbouring in CUB's class ids, which follow the
taxonomy, so that each problem holds related species as cub10 does (its classes are 001-010:
three albatrosses, three auklets...); ``--grouping random`` draws them at random, which
gives easier problems of unrelated species. Each problem is written as
a CUB-200-2011 root (``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
``train_test_split.txt`` with the held-out photos marked 0, and ``images`` linked to the
source's), so any recipe runs on it unchanged with ``--data.root``; what a run reports as
"test" is then accuracy on held-out training photos, i.e. validation data. No test photo of
the source is ever written.

``--exclude`` leaves classes out (by official class id), e.g. the ten of cub10, so that the
problems share no class with the data set whose test split is measured afterwards.

Example (nine 10-class problems from cub100's training split, without cub10's classes)::

    python benchmarks/class_subsets.py --root ../shared/realdata/cub100/CUB_200_2011 \\
        --out runs/valbed --problems 9 --classes 10 --train-per-class 15 --exclude 1-10

and then, for problem ``j``::

    crasmra fit --config configs/cub10/cra-smra.yaml \\
        --data.root runs/valbed/problem-j/CUB_200_2011 --seed_everything j
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from crasmra.data.benchmarks.common import find_base, keyed, split_flag

T = TypeVar("T")

#: How the classes of a problem are chosen.
GROUPINGS = ("consecutive", "random")


def _read(base: Path, name: str, parse: Callable[[str], T], expected: str) -> dict[int, T]:
    """A CUB annotation file as {integer id: parsed value}, read as the CUB loader reads it
    (malformed lines and repeated ids refused)."""
    return {int(k): v for k, v in keyed("cub", base / name, parse, expected).items()}


def _parse_ids(spec: str) -> set[int]:
    """``"1-10,17"`` -> {1, ..., 10, 17}."""
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


def write_problems(
    root: Path,
    out: Path,
    *,
    problems: int,
    classes: int,
    train_per_class: int,
    exclude: set[int],
    seed: int,
    grouping: str = "consecutive",
) -> list[dict[str, object]]:
    """Write ``problems`` CUB roots under ``out``; returns what each holds.

    Raises:
        SystemExit: the source is not a CUB root, or holds too few classes or photos.
        ValueError: an unknown ``grouping``.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    base = find_base(root, ["CUB_200_2011", ""], "images.txt")
    if base is None:
        raise SystemExit(f"{root} is not a CUB-200-2011 root: no images.txt (pass --root)")
    images = _read(base, "images.txt", str, "an image path")
    labels = _read(base, "image_class_labels.txt", int, "an integer class id")
    is_train = _read(base, "train_test_split.txt", split_flag, "1 (train) or 0 (test)")
    names = _read(base, "classes.txt", str, "a class folder name")

    train_by_class: dict[int, list[int]] = defaultdict(list)
    for image_id in sorted(images):
        if is_train[image_id] and labels[image_id] not in exclude:
            train_by_class[labels[image_id]].append(image_id)
    eligible = sorted(c for c, ids in train_by_class.items() if len(ids) > train_per_class)
    if len(eligible) < problems * classes:
        raise SystemExit(
            f"{len(eligible)} classes have more than {train_per_class} training photos; "
            f"{problems} problems of {classes} disjoint classes need {problems * classes} "
            "(lower --problems, --classes or --train-per-class)"
        )
    rng = random.Random(seed)
    # eligible is in class-id order: consecutive groups are taxonomic neighbours.
    order = eligible if grouping == "consecutive" else rng.sample(eligible, len(eligible))
    summaries = []
    for index in range(problems):
        chosen = sorted(order[index * classes : (index + 1) * classes])
        problem = out / f"problem-{index}" / "CUB_200_2011"
        problem.mkdir(parents=True, exist_ok=True)
        kept: list[tuple[int, bool]] = []
        for class_id in chosen:
            photos = train_by_class[class_id]
            trained = set(rng.sample(photos, train_per_class))
            kept.extend((image_id, image_id in trained) for image_id in photos)
        kept.sort()
        (problem / "images.txt").write_text("".join(f"{i} {images[i]}\n" for i, _ in kept))
        (problem / "image_class_labels.txt").write_text(
            "".join(f"{i} {labels[i]}\n" for i, _ in kept)
        )
        (problem / "train_test_split.txt").write_text(
            "".join(f"{i} {int(t)}\n" for i, t in kept)
        )
        (problem / "classes.txt").write_text("".join(f"{c} {names[c]}\n" for c in chosen))
        link = problem / "images"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((base / "images").resolve(), target_is_directory=True)
        summaries.append(
            {
                "problem": index,
                "root": str(problem),
                "classes": chosen,
                "train": sum(t for _, t in kept),
                "held_out": sum(not t for _, t in kept),
            }
        )
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a CUB-200-2011 root")
    parser.add_argument("--out", type=Path, required=True, help="where the problems go")
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10, help="classes per problem")
    parser.add_argument("--train-per-class", type=int, default=15)
    parser.add_argument("--exclude", default="", help="class ids to leave out, e.g. 1-10")
    parser.add_argument("--grouping", choices=GROUPINGS, default="consecutive",
                        help="neighbouring class ids (related species) or a random draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = parser.parse_args(argv)
    for name in ("problems", "classes", "train_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    summaries = write_problems(
        args.root,
        args.out,
        problems=args.problems,
        classes=args.classes,
        train_per_class=args.train_per_class,
        exclude=_parse_ids(args.exclude),
        seed=args.seed,
        grouping=args.grouping,
    )
    json.dump(summaries, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
