"""Folders (issue 24, items 10 and 11): class folders that are links out of their split are
skipped, and deep folders end in a message, not a RecursionError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crasmra.inference import find_images
from untrusted_helpers import png


# ---------------------------------------------------------------------------------------------
# 10-11. folders
# ---------------------------------------------------------------------------------------------
def _folder_set(root: Path) -> Path:
    for split in ("train", "test"):
        for name in ("cow", "dog"):
            for i in range(2):
                png(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("link", ["outside", "split", "sibling"])
def test_a_class_folder_linking_out_of_its_split_is_skipped(
    link: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from crasmra.data.factory import load_annotations

    root = _folder_set(tmp_path / "set")
    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        png(elsewhere / "sub" / f"{i}.png")
    name, target = {"outside": ("cat", elsewhere), "split": ("aaa", root / "train"),
                    "sibling": ("aab", root / "train" / "dog")}[link]
    (root / "train" / name).symlink_to(target)
    ann = load_annotations("folder", root)
    assert ann.classes == ["cow", "dog"]
    assert len(ann.train) == 4
    assert f"skipping the class folder {root / 'train' / name}" in caplog.text


def test_a_class_folder_linking_inside_its_split_is_kept(tmp_path: Path) -> None:
    from crasmra.data.factory import load_annotations

    root = _folder_set(tmp_path / "set")
    for i in range(2):
        png(root / "train" / ".cats" / f"{i}.png")
    (root / "train" / "cat").symlink_to(root / "train" / ".cats")
    (root / "test" / "cat").mkdir()
    assert load_annotations("folder", root).classes == ["cat", "cow", "dog"]


def _deep(root: Path, depth: int) -> Path:
    """An image ``depth`` folders below ``root`` (made one level at a time: ``mkdir
    parents=True`` recurses)."""
    folder = root
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(depth):
        folder = folder / "d"
        folder.mkdir()
    return png(folder / "x.png")


def _remove_tree(root: Path) -> None:
    """``shutil.rmtree`` without recursion (it fails on a tree 1,000 levels deep, and so would
    pytest's own clean-up of old temporary folders)."""
    stack = [root]
    while stack:
        folder = stack[-1]
        entries = list(os.scandir(folder))
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
        subfolders = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        if subfolders:
            stack.extend(subfolders)
        else:
            folder.rmdir()
            stack.pop()


def test_a_deep_folder_is_no_recursion_error(tmp_path: Path) -> None:
    from crasmra.data.errors import DatasetRootError
    from crasmra.data.factory import load_annotations

    try:
        _deep(tmp_path / "pred", 1_500)
        files, failures = find_images([tmp_path / "pred"])
        assert files == [] and len(failures) == 1
        assert "64 folders" in failures[0].reason[-200:]
        root = _folder_set(tmp_path / "set")
        _deep(root / "train" / "cat", 1_200)
        (root / "test" / "cat").mkdir()
        with pytest.raises(DatasetRootError, match="64 folders"):
            load_annotations("folder", root)
    finally:
        _remove_tree(tmp_path)


def test_a_folder_within_the_depth_limit_is_read(tmp_path: Path) -> None:
    image = _deep(tmp_path / "pred", 40)
    assert find_images([tmp_path / "pred"])[0] == [image]
