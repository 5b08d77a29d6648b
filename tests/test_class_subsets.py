"""benchmarks/class_subsets.py: validation problems cut from a CUB training split."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from crasmra.data.benchmarks.cub import load_cub
from data_fixtures import build_cub

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import class_subsets  # noqa: E402


def _pairs(path: Path) -> dict[int, str]:
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines())
    return {int(key): value for key, value in rows}


@pytest.mark.filterwarnings("ignore:cub. found .* the official count")
def test_problems_hold_disjoint_classes_and_only_training_photos(tmp_path: Path) -> None:
    source = build_cub(tmp_path / "cub", images=False) / "CUB_200_2011"
    official_train = {k for k, v in _pairs(source / "train_test_split.txt").items() if v == "1"}
    labels = {k: int(v) for k, v in _pairs(source / "image_class_labels.txt").items()}

    summaries = class_subsets.write_problems(
        source.parent, tmp_path / "bed", problems=3, classes=4, train_per_class=7,
        exclude={1, 2, 3, 4, 5}, seed=0,
    )

    seen: set[int] = set()
    for summary in summaries:
        base = Path(str(summary["root"]))
        chosen = set(summary["classes"])  # type: ignore[arg-type]
        assert len(chosen) == 4 and not chosen & {1, 2, 3, 4, 5} and not chosen & seen
        seen |= chosen
        split = _pairs(base / "train_test_split.txt")
        # Every photo of the problem is an official training photo of a chosen class ...
        assert set(split) <= official_train
        assert {labels[i] for i in split} == chosen
        # ... all of them: the chosen classes' training photos, 7 per class to train on.
        assert set(split) == {i for i in official_train if labels[i] in chosen}
        trained = Counter(labels[i] for i, flag in split.items() if flag == "1")
        assert trained == {c: 7 for c in chosen}
        # The project's own loader reads it as a CUB root, held-out photos as its test split.
        annotations = load_cub(base.parent, check_files=False)
        assert len(annotations.classes) == 4
        assert len(annotations.train) == 28
        assert len(annotations.test) == sum(flag == "0" for flag in split.values())
        assert (base / "images").resolve() == (source / "images").resolve()


def test_consecutive_problems_take_neighbouring_class_ids(tmp_path: Path) -> None:
    source = build_cub(tmp_path / "cub", images=False)
    summaries = class_subsets.write_problems(
        source, tmp_path / "bed", problems=2, classes=3, train_per_class=5, exclude={2},
        seed=0,
    )
    # CUB's ids follow the taxonomy: related species, as cub10's classes 001-010 are.
    assert [s["classes"] for s in summaries] == [[1, 3, 4], [5, 6, 7]]


def test_the_draws_are_seeded(tmp_path: Path) -> None:
    source = build_cub(tmp_path / "cub", images=False)

    def draw(out: str, seed: int) -> list[object]:
        return class_subsets.write_problems(
            source, tmp_path / out, problems=2, classes=3, train_per_class=5, exclude=set(),
            seed=seed, grouping="random",
        )

    first, again, other = draw("a", 4), draw("b", 4), draw("c", 5)
    assert [s["classes"] for s in first] == [s["classes"] for s in again]
    assert [s["classes"] for s in first] != [s["classes"] for s in other]
    assert [s["classes"] for s in first] != [[1, 2, 3], [4, 5, 6]]
    split = "problem-1/CUB_200_2011/train_test_split.txt"
    assert (tmp_path / "a" / split).read_text() == (tmp_path / "b" / split).read_text()
    # The photos trained on are a seeded draw too, not the first ones of each class.
    consecutive = class_subsets.write_problems(
        source, tmp_path / "d", problems=1, classes=3, train_per_class=5, exclude=set(), seed=1,
    )
    again = class_subsets.write_problems(
        source, tmp_path / "e", problems=1, classes=3, train_per_class=5, exclude=set(), seed=2,
    )
    assert consecutive[0]["classes"] == again[0]["classes"]
    split = "problem-0/CUB_200_2011/train_test_split.txt"
    assert (tmp_path / "d" / split).read_text() != (tmp_path / "e" / split).read_text()


def test_too_few_classes_is_refused_with_what_to_lower(tmp_path: Path) -> None:
    source = build_cub(tmp_path / "cub", images=False)
    with pytest.raises(SystemExit, match="lower --problems"):
        class_subsets.write_problems(
            source, tmp_path / "bed", problems=30, classes=10, train_per_class=5,
            exclude=set(), seed=0,
        )
    with pytest.raises(ValueError, match="grouping must be one of"):
        class_subsets.write_problems(
            source, tmp_path / "bed", problems=1, classes=1, train_per_class=1,
            exclude=set(), seed=0, grouping="alphabetical",
        )
    with pytest.raises(SystemExit, match="not a CUB-200-2011 root"):
        class_subsets.write_problems(
            tmp_path, tmp_path / "bed", problems=1, classes=1, train_per_class=1,
            exclude=set(), seed=0,
        )


def test_exclude_ranges_parse() -> None:
    assert class_subsets._parse_ids("1-3, 7") == {1, 2, 3, 7}
    assert class_subsets._parse_ids("") == set()
