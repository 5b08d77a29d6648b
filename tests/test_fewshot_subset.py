"""The seeded few-shot subset of the training split (``train_per_class``/``subset_seed``).

Most tests read the real CUB-200-2011 annotation lists (../shared/fixtures) without images
(``check_files=False``: nothing is decoded); one builds a tiny folder dataset of JPEGs.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path

import pytest

from crasmra.data import FGVCDataModule, create_dataset
from crasmra.data.base import Annotations, Record, few_shot_subset, select_split
from crasmra.data.factory import load_annotations
from data_fixtures import fixtures_dir, jpeg_bytes

BAD_VALUE = (
    r"train_per_class must be an integer >= 1 \(photos per class\), got .*; "
    r"change --data\.train_per_class"
)


@pytest.fixture(scope="module")
def cub() -> Annotations:
    return load_annotations("cub", fixtures_dir() / "cub", check_files=False)


def _paths(records) -> list[str]:
    return [r.path for r in records]


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
def test_every_class_keeps_exactly_n_photos(cub: Annotations, n: int, val_fraction: float) -> None:
    subset = select_split(cub, "train", val_fraction, 0, train_per_class=n, subset_seed=0)
    counts = Counter(r.label for r in subset)
    assert len(counts) == len(cub.classes) == 200
    assert set(counts.values()) == {n}
    # In annotation order, with no duplicates.
    order = {r.path: i for i, r in enumerate(cub.train)}
    assert [order[p] for p in _paths(subset)] == sorted(order[p] for p in _paths(subset))


def test_same_seed_same_photos_other_seed_other_photos(cub: Annotations) -> None:
    def draw(seed: int) -> list[str]:
        return _paths(select_split(cub, "train", 0.1, 0, train_per_class=2, subset_seed=seed))

    assert draw(0) == draw(0)
    assert draw(7) == draw(7)
    assert draw(0) != draw(1)
    assert len(set(draw(0)) ^ set(draw(1))) > 100  # most photos change, not one


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
def test_subsets_are_nested(cub: Annotations, seed: int, val_fraction: float) -> None:
    sizes = (1, 2, 5, 10)
    subsets = [
        set(_paths(select_split(cub, "train", val_fraction, 0, train_per_class=n,
                                subset_seed=seed)))
        for n in sizes
    ]
    for smaller, larger in itertools.pairwise(subsets):
        assert smaller < larger


def test_subset_is_drawn_after_validation_was_carved_out(cub: Annotations) -> None:
    val = set(_paths(select_split(cub, "val", 0.2, 4)))
    train = set(_paths(select_split(cub, "train", 0.2, 4)))
    for n in (1, 5, 20):
        for seed in (0, 1, 2):
            subset = set(_paths(select_split(cub, "train", 0.2, 4, train_per_class=n,
                                             subset_seed=seed)))
            assert not subset & val
            assert subset <= train
    # Enough photos per class: the subset is the whole train split, val stays out.
    everything = select_split(cub, "train", 0.2, 4, train_per_class=1000)
    assert set(_paths(everything)) == train
    # The val and test splits do not depend on the subset.
    assert _paths(select_split(cub, "val", 0.2, 4, train_per_class=1)) == _paths(
        select_split(cub, "val", 0.2, 4)
    )
    assert _paths(select_split(cub, "test", 0.2, 4, train_per_class=1)) == _paths(cub.test)


def test_without_validation_the_subset_comes_from_the_whole_training_split(
    cub: Annotations,
) -> None:
    held_out = set(_paths(select_split(cub, "val", 0.5, 0)))
    drawn: set[str] = set()
    for seed in range(4):
        drawn |= set(_paths(select_split(cub, "train", 0.0, 0, train_per_class=5,
                                         subset_seed=seed)))
    assert drawn <= set(_paths(cub.train))
    assert drawn & held_out  # photos a val split would have taken are candidates here


def test_short_classes_keep_all_their_photos(caplog: pytest.LogCaptureFixture) -> None:
    records = [Record(f"a{i}.jpg", 0) for i in range(6)] + [
        Record(f"b{i}.jpg", 1) for i in range(2)
    ] + [Record(f"c{i}.jpg", 2) for i in range(1)]
    with caplog.at_level(logging.WARNING, logger="crasmra.data.base"):
        kept = few_shot_subset(records, 3, seed=0, name="toy/train")
    counts = Counter(r.label for r in kept)
    assert counts == {0: 3, 1: 2, 2: 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 3 classes" in warnings[0].getMessage()
    assert "toy/train" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crasmra.data.base"):
        few_shot_subset(records, 1, seed=0)
    assert not caplog.records


def test_a_class_subset_does_not_depend_on_the_other_classes() -> None:
    a = [Record(f"a{i}.jpg", 0) for i in range(10)]
    b = [Record(f"b{i}.jpg", 1) for i in range(10)]
    alone = few_shot_subset(a, 3, seed=5)
    mixed = few_shot_subset(b[:4] + a + b[4:], 3, seed=5)
    assert [r for r in mixed if r.label == 0] == alone


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_values_are_refused_with_what_to_change(cub: Annotations, bad: object) -> None:
    with pytest.raises(ValueError, match=BAD_VALUE):
        select_split(cub, "train", 0.1, 0, train_per_class=bad)
    with pytest.raises(ValueError, match=BAD_VALUE):
        few_shot_subset(cub.train, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=BAD_VALUE):
        FGVCDataModule("cub", str(fixtures_dir() / "cub"), num_workers=0,
                       options={"check_files": False}, train_per_class=bad)  # type: ignore[arg-type]


def test_bad_subset_seed_is_refused(cub: Annotations) -> None:
    message = r"subset_seed must be an integer >= 0.*--data\.subset_seed"
    with pytest.raises(ValueError, match=message):
        select_split(cub, "train", 0.1, 0, train_per_class=2, subset_seed=-1)


def test_synthetic_points_to_samples_per_class() -> None:
    with pytest.raises(ValueError, match=r"--data\.options '\{samples_per_class: N\}'"):
        FGVCDataModule("synthetic", num_workers=0, train_per_class=2)
    with pytest.raises(ValueError, match=r"samples_per_class"):
        create_dataset("synthetic", None, "train", train_per_class=2)


def test_the_datamodule_exposes_and_applies_the_subset(cub: Annotations) -> None:
    root = str(fixtures_dir() / "cub")
    dm = FGVCDataModule("cub", root, num_workers=0, val_fraction=0.1, split_seed=2,
                        options={"check_files": False}, train_per_class=3, subset_seed=4)
    assert (dm.train_per_class, dm.subset_seed) == (3, 4)
    assert dm.hparams["train_per_class"] == 3 and dm.hparams["subset_seed"] == 4
    dm.setup("fit")
    train_paths = [p for p, _ in dm.train_dataset.samples]
    assert train_paths == _paths(select_split(cub, "train", 0.1, 2, train_per_class=3,
                                              subset_seed=4))
    assert set(Counter(dm.train_dataset.targets).values()) == {3}
    val_paths = [p for p, _ in dm.val_dataset.samples]
    assert val_paths == _paths(select_split(cub, "val", 0.1, 2))
    assert not set(train_paths) & set(val_paths)
    # The default trains on the whole split.
    full = FGVCDataModule("cub", root, num_workers=0, options={"check_files": False})
    assert full.train_per_class is None
    full.setup("fit")
    assert len(full.train_dataset) == len(select_split(cub, "train", 0.1, 0))


def test_create_dataset_subsets_a_folder_of_images(tmp_path: Path) -> None:
    for split, per_class in (("train", {"ant": 4, "bee": 1}), ("test", {"ant": 1, "bee": 1})):
        for cls, n in per_class.items():
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(color=(10 * i, 80, 160)))
    ds = create_dataset("folder", tmp_path, "train", image_size=8, resize_size=8,
                        val_fraction=0.0, train_per_class=2, subset_seed=1)
    assert Counter(ds.targets) == {0: 2, 1: 1}  # bee has a single photo and keeps it
    image, _ = ds[0]
    assert tuple(image.shape) == (3, 8, 8)
    again = create_dataset("folder", tmp_path, "train", image_size=8, resize_size=8,
                           val_fraction=0.0, train_per_class=2, subset_seed=1)
    assert again.samples == ds.samples
    with pytest.raises(ValueError, match=BAD_VALUE):
        create_dataset("folder", tmp_path, "train", train_per_class=0)


def test_the_command_line_refuses_a_bad_value_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import REPO, run_cli

    code = run_cli(["fit", f"--config={REPO / 'configs' / 'demo.yaml'}",
                    "--data.train_per_class", "0", "--trainer.max_epochs", "1",
                    f"--trainer.default_root_dir={tmp_path}"])
    assert code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "train_per_class" in line]
    assert len(err) == 1
    assert "change --data.train_per_class" in err[0]
