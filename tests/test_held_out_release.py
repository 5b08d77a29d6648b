"""benchmarks/held_out_release.py: a validation root held out on another collection's photos."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crasmra.data.benchmarks.cub import load_cub

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import held_out_release  # noqa: E402


def _photo(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)


def _root(base: Path, rows: list[tuple[int, int, int, int]], classes: dict[int, str],
          prefix: str) -> Path:
    """A CUB root of ``rows`` (image id, class id, 1 train / 0 test, photo seed)."""
    cub = base / "CUB_200_2011"
    paths = {i: f"{classes[c]}/{prefix}_{i}.jpg" for i, c, _, _ in rows}
    for i, _, _, seed in rows:
        _photo(cub / "images" / paths[i], seed)
    (cub / "images.txt").write_text("".join(f"{i} {paths[i]}\n" for i, *_ in rows))
    (cub / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _, _ in rows))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in rows))
    (cub / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in classes.items()))
    return base


CLASSES = {1: "001.Albatross", 2: "002.Auklet"}


@pytest.mark.filterwarnings("ignore:cub. found .* the official count")
def test_trains_on_the_first_root_and_holds_out_the_others_training_photos(
        tmp_path: Path) -> None:
    first = _root(tmp_path / "first", [(1, 1, 1, 10), (2, 1, 0, 11), (3, 2, 1, 12),
                                       (4, 2, 0, 13)], CLASSES, "a")
    # Photo 23 of the second root is the first root's test photo 2, squashed and recompressed:
    # a copy. Class 3 is not the first root's; photos 24 and 25 are the second's test photos.
    second = _root(tmp_path / "second", [(21, 1, 1, 20), (22, 2, 1, 21), (23, 1, 1, 11),
                                         (24, 1, 0, 22), (25, 2, 0, 23), (26, 3, 1, 24)],
                   {**CLASSES, 3: "003.Ani"}, "b")
    copy = second / "CUB_200_2011/images/001.Albatross/b_23.jpg"
    Image.open(first / "CUB_200_2011/images/001.Albatross/a_2.jpg").resize((64, 64)).save(
        copy, quality=70)

    summary = held_out_release.write_root(first, second, tmp_path / "out")

    assert summary["train"] == 2 and summary["held_out"] == 2
    assert summary["duplicates_left_out"] == 1
    annotations = load_cub(tmp_path / "out")
    train = sorted((Path(r.path).name, r.label) for r in annotations.train)
    held_out = sorted((Path(r.path).name, r.label) for r in annotations.test)
    # The first root's training photos, unchanged; the second's training photos of the same
    # classes except the copy: no test photo of either root, no foreign class.
    assert train == [("a_1.jpg", 0), ("a_3.jpg", 1)]
    assert held_out == [("b_21.jpg", 0), ("b_22.jpg", 1)]
    for record in annotations.train + annotations.test:
        assert Path(record.path).is_file()


def test_without_the_duplicate_check_the_copy_is_held_out(tmp_path: Path) -> None:
    first = _root(tmp_path / "first", [(1, 1, 1, 10), (2, 1, 0, 11)], CLASSES, "a")
    second = _root(tmp_path / "second", [(21, 1, 1, 11), (22, 1, 1, 12)], CLASSES, "b")

    assert held_out_release.write_root(first, second, tmp_path / "out")["held_out"] == 1
    summary = held_out_release.write_root(first, second, tmp_path / "again",
                                          duplicate_correlation=1.0)
    assert summary["held_out"] == 2 and summary["duplicates_left_out"] == 0


def test_classes_named_differently_are_refused(tmp_path: Path) -> None:
    first = _root(tmp_path / "first", [(1, 1, 1, 10)], CLASSES, "a")
    second = _root(tmp_path / "second", [(21, 1, 1, 11)], {1: "001.Gull"}, "b")
    with pytest.raises(SystemExit, match=r"class 1 is '001\.Albatross'.*'001\.Gull'"):
        held_out_release.write_root(first, second, tmp_path / "out")


def test_no_shared_training_photo_is_refused(tmp_path: Path) -> None:
    first = _root(tmp_path / "first", [(1, 1, 1, 10)], CLASSES, "a")
    second = _root(tmp_path / "second", [(21, 1, 0, 11), (22, 3, 1, 12)],
                   {1: CLASSES[1], 3: "003.Ani"}, "b")
    with pytest.raises(SystemExit, match="no training photo"):
        held_out_release.write_root(first, second, tmp_path / "out")


def test_a_wrong_root_names_its_flag(tmp_path: Path) -> None:
    first = _root(tmp_path / "first", [(1, 1, 1, 10)], CLASSES, "a")
    with pytest.raises(SystemExit, match="--held-out-root"):
        held_out_release.write_root(first, tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(SystemExit):
        held_out_release.main(["--train-root", str(first), "--held-out-root", str(first),
                               "--out", str(tmp_path / "o"), "--duplicate-correlation", "2"])
