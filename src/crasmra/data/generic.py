"""User datasets: a folder per class ("folder") and a CSV of path,label rows ("csv")."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from crasmra.data.base import Annotations, Record, check_files_exist
from crasmra.data.errors import DatasetRootError

__all__ = ["IMAGE_EXTENSIONS", "load_csv", "load_folder"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".jfif",
)

FOLDER_LAYOUT = """\
  <root>/train/<class name>/<image>.jpg ...
  <root>/test/<class name>/<image>.jpg ...
  <root>/val/<class name>/<image>.jpg ...   (optional; otherwise val is carved from train)"""

CSV_LAYOUT = """\
  A CSV file (root) with rows  path,label[,split]  and an optional header row
  (columns named path/label/split). Paths are relative to the CSV's folder; labels are
  class names or integer ids; split is train, val or test. Without a split column the
  file is the training set and the test set comes from test_csv=... or a sibling file
  whose name has 'test' in place of 'train' (train.csv -> test.csv)."""


def _scan_class_dir(split_dir: Path) -> dict[str, list[str]]:
    """``{class folder: sorted image paths}`` under ``split_dir``; hidden entries skipped."""
    out: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            )
        out[entry.name] = files
    return out


def load_folder(root: Path) -> Annotations:
    """One sub-folder per class under ``train/`` and ``test/`` (optional ``val/``).

    Classes are the sorted folder names of ``train/``; ``test/`` and ``val/`` may only
    use those names. Images are files with a known extension, searched recursively.
    """
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        where = (
            f"{root} does not exist"
            if not root.exists()
            else (f"{root} has no " + " or ".join(f"{s}/" for s in missing) + " folder")
        )
        raise DatasetRootError(f"folder: {where}.\nExpected layout:\n{FOLDER_LAYOUT}")
    scanned = {
        s: _scan_class_dir(root / s) for s in ("train", "val", "test") if (root / s).is_dir()
    }
    classes = list(scanned["train"])
    if not classes:
        raise DatasetRootError(
            f"folder: {root / 'train'} has no class sub-folders.\n{FOLDER_LAYOUT}"
        )
    index_of = {c: i for i, c in enumerate(classes)}

    def records(split: str) -> list[Record]:
        unknown = sorted(set(scanned[split]) - set(index_of))
        if unknown:
            raise DatasetRootError(
                f"folder: {root / split} has class folders not in train/: {unknown[:5]}"
            )
        return [Record(p, index_of[c]) for c, paths in scanned[split].items() for p in paths]

    train = records("train")
    empty = [c for c in classes if not scanned["train"][c]]
    if empty:
        raise DatasetRootError(
            f"folder: class folders without images under {root / 'train'}: {empty[:5]} "
            f"(image extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    val = records("val") if "val" in scanned else None
    return Annotations("folder", root, classes, train, records("test"), val, train if val else None)


def _read_csv_rows(path: Path) -> tuple[list[dict[str, str]], bool]:
    """Rows as dicts with keys path/label[/split]; also whether a split column exists."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        rows = [r for r in csv.reader(fh, dialect) if r and any(c.strip() for c in r)]
    if not rows:
        raise DatasetRootError(f"csv: {path} is empty.\n{CSV_LAYOUT}")
    head = [c.strip().lower() for c in rows[0]]
    path_names = {"path", "file", "filename", "image", "image_path", "filepath"}
    label_names = {"label", "class", "class_name", "target", "category"}
    if set(head) & path_names:
        pcol = next(i for i, c in enumerate(head) if c in path_names)
        lcols = [i for i, c in enumerate(head) if c in label_names]
        if not lcols:
            raise DatasetRootError(f"csv: {path} has a header but no label column: {rows[0]}")
        scols = [i for i, c in enumerate(head) if c == "split"]
        cols, body = (pcol, lcols[0], scols[0] if scols else None), rows[1:]
    else:
        cols, body = (0, 1, 2 if len(rows[0]) >= 3 else None), rows
    pcol, lcol, scol = cols
    out = []
    for lineno, r in enumerate(body, 2 if body is not rows else 1):
        if len(r) <= max(c for c in cols if c is not None):
            raise DatasetRootError(f"csv: {path}:{lineno}: expected path,label[,split], got {r}")
        row = {"path": r[pcol].strip(), "label": r[lcol].strip()}
        if scol is not None:
            row["split"] = r[scol].strip().lower()
        out.append(row)
    return out, scol is not None


def _class_list(labels: list[str]) -> list[str]:
    uniq = set(labels)
    if all(lab.lstrip("-").isdigit() for lab in uniq):
        return [str(v) for v in sorted(int(lab) for lab in uniq)]
    return sorted(uniq)


def load_csv(
    root: Path,
    *,
    test_csv: str | os.PathLike[str] | None = None,
    skip_bad_images: bool = False,
    check_files: bool = True,
) -> Annotations:
    """A CSV of ``path,label[,split]`` rows, paths relative to the file (see ``CSV_LAYOUT``).

    Classes are the sorted label names (integers sorted numerically, so ids 0..K-1 keep
    their meaning). A ``split`` column with ``val`` rows gives an explicit val set;
    otherwise val is carved from the train rows.
    """
    if not root.is_file():
        raise DatasetRootError(f"csv: {root} is not a file; root must be the CSV.\n{CSV_LAYOUT}")
    rows, has_split = _read_csv_rows(root)
    splits = {"train": [], "val": [], "test": []}
    if has_split:
        for r in rows:
            s = {"trainval": "train", "validation": "val", "valid": "val"}.get(
                r["split"], r["split"]
            )
            if s not in splits:
                raise DatasetRootError(
                    f"csv: {root}: unknown split {r['split']!r} (train/val/test)"
                )
            splits[s].append((root.parent, r))
    else:
        splits["train"] = [(root.parent, r) for r in rows]
        test_path = Path(test_csv) if test_csv is not None else None
        if test_path is None and "train" in root.name:
            sibling = root.with_name(root.name.replace("train", "test"))
            test_path = sibling if sibling.is_file() else None
        if test_path is not None:
            if not test_path.is_file():
                raise DatasetRootError(f"csv: test_csv {test_path} does not exist")
            test_rows, _ = _read_csv_rows(test_path)
            splits["test"] = [(test_path.parent, r) for r in test_rows]
    if not splits["train"]:
        raise DatasetRootError(f"csv: {root} has no training rows.\n{CSV_LAYOUT}")
    classes = _class_list([r["label"] for _, r in splits["train"]])
    index_of = {c: i for i, c in enumerate(classes)}

    def records(split: str) -> list[Record]:
        out = []
        for base, r in splits[split]:
            label = str(int(r["label"])) if r["label"].lstrip("-").isdigit() else r["label"]
            if label not in index_of:
                raise DatasetRootError(f"csv: {split} label {r['label']!r} never occurs in train")
            out.append(Record(str((base / r["path"]).resolve()), index_of[label]))
        return out

    train, val, test = records("train"), records("val"), records("test")
    if check_files:
        missing = check_files_exist(
            [r.path for r in (*train, *val, *test)],
            dataset="csv",
            layout=CSV_LAYOUT,
            url="your own CSV",
            root=root,
            allow_missing=skip_bad_images,
        )
        if missing:
            train, val, test = (
                [r for r in rs if r.path not in missing] for rs in (train, val, test)
            )
    ann = Annotations("csv", root, classes, train, test, val or None, train if val else None)
    ann.extra["has_test"] = bool(test) or has_split
    return ann
