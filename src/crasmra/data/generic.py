"""User datasets: a folder per class ("folder") and a CSV of path,label rows ("csv")."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from crasmra.data.base import Annotations, Record, check_files_exist
from crasmra.data.errors import DatasetRootError, ImageLoadError, read_utf8
from crasmra.data.image import file_problem

__all__ = ["IMAGE_EXTENSIONS", "MAX_FOLDER_DEPTH", "class_folders", "images_under", "load_csv",
           "load_folder", "walk"]

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


#: The deepest folder, counted from the folder searched, whose files are read. Real data sets
#: nest a few levels; a folder hundreds of levels deep is a trap (Python's own recursive
#: walks fail there with RecursionError), refused with a message.
MAX_FOLDER_DEPTH = 64


def walk(
    top: str | os.PathLike[str], *, follow_links: bool = True, max_depth: int = MAX_FOLDER_DEPTH
):
    """``os.walk(top, followlinks=follow_links)`` (top-down; ``dirnames`` may be pruned in
    place), without recursion and with a depth limit.

    ``os.walk`` and ``Path.rglob`` recurse (before Python 3.12), so a folder nested 1,000
    levels deep ends them in RecursionError. Unreadable folders are skipped, as ``os.walk``
    skips them.

    Raises:
        DatasetRootError: A folder lies more than ``max_depth`` levels below ``top``.
    """
    stack: list[tuple[str, int]] = [(os.fspath(top), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        dirnames, filenames = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=follow_links)
            except OSError:
                is_dir = False
            (dirnames if is_dir else filenames).append(entry.name)
        yield folder, dirnames, filenames
        if dirnames and depth + 1 > max_depth:
            deep = os.path.relpath(os.path.join(folder, dirnames[0]), top)
            if len(deep) > 60:
                deep = f"{deep[:25]}...{deep[-25:]}"
            raise DatasetRootError(
                f"{os.fspath(top)} has folders more than {max_depth} folders below it ({deep}); "
                f"crasmra reads images at most {max_depth} levels deep. Move the images up, or "
                "point at a deeper folder."
            )
        # Reversed, so that folders are visited in the order dirnames lists them.
        stack.extend((os.path.join(folder, d), depth + 1) for d in reversed(dirnames))


def images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (by extension), hidden entries left out, sorted.

    Walked with :func:`walk`, so a deep folder cannot end in RecursionError; links to folders
    are not followed (a link loop or a link to ``/`` would walk without end).

    Raises:
        DatasetRootError: A folder lies too deep below ``folder``.
    """
    found = []
    for dirpath, dirnames, filenames in walk(folder, follow_links=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
                     and (Path(dirpath) / f).is_file())
    return sorted(found)


def class_folders(split_dir: Path) -> list[os.DirEntry[str]]:
    """The class folders of a split (``train/``, ``val/``, ``test/``), sorted by name.

    Hidden entries and files are left out. A class folder that is a link is followed only
    when it leads to a folder inside the split that no other class folder contains, lies in
    or is: a link out of the split (``cat -> /usr/share``) would label whatever it reaches,
    and ``aab -> dog`` would take ``dog``'s images. Such links are skipped with a warning,
    and nothing under them is read.
    """
    entries = [e for e in sorted(os.scandir(split_dir), key=lambda e: e.name)
               if not e.name.startswith(".") and e.is_dir()]
    split_real = os.path.realpath(split_dir)
    plain = {os.path.realpath(e.path) for e in entries if not e.is_symlink()}
    kept = []
    for entry in entries:
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            overlaps = [p for p in plain if _inside(real, p) or _inside(p, real)]
            if not _inside(real, split_real) or real == split_real or overlaps:
                if real == split_real:
                    why = "the split folder itself"
                elif _inside(real, split_real):
                    why = f"which overlaps the class folder {os.path.basename(overlaps[0])}"
                else:
                    why = f"outside {split_dir}"
                logger.warning(
                    "folder: skipping the class folder %s: it is a link to %s, %s; a class "
                    "folder must be a folder of its split (copy or move the images there)",
                    entry.path, real, why)
                continue
        kept.append(entry)
    return kept


def _inside(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies under it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _bad_entry(path: str, problem: str, skip_bad_images: bool) -> None:
    """Refuse an entry named like an image that is none, or warn with ``skip_bad_images``."""
    if not skip_bad_images:
        raise ImageLoadError(path, f"{problem}; or pass skip_bad_images=True to skip such files")
    logger.warning("folder: skipping %s: %s", path, problem)


def _scan_class_dir(split_dir: Path, skip_bad_images: bool = False) -> dict[str, list[str]]:
    """``{class folder: sorted real image paths}`` under ``split_dir``; hidden entries skipped.

    Class folders are those of :func:`class_folders` (a class folder that is a link out of
    the split, or onto another class, is skipped). Below them, links are followed, but each
    image is listed once, by its real path, under the class
    folder it really sits in: otherwise a link such as ``cat/loop -> ..`` walks every class
    again, as many times as the loop nests, and labels all of it "cat". So a link to a folder
    already walked (a loop) and a link that leaves its class folder are skipped with a
    warning. An entry with an image extension that is not a regular file (a folder, a FIFO, a
    device) is refused here, or skipped with a warning with ``skip_bad_images``; the contents
    of image files are checked when they are decoded.
    """
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}  # real path of every listed image -> its class folder
    for entry in class_folders(split_dir):
        class_dir = os.path.realpath(entry.path)
        walked = {class_dir}
        files = []
        for dirpath, dirnames, filenames in walk(entry.path, follow_links=True):
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                sub = os.path.join(dirpath, d)
                if d.lower().endswith(IMAGE_EXTENSIONS):  # "x.jpg/": a folder, not an image
                    _bad_entry(sub, file_problem(sub) or "", skip_bad_images)
                    continue
                real = os.path.realpath(sub)
                if real in walked or not _inside(real, class_dir):
                    why = (
                        "a folder already scanned (a directory loop, or a second link to it)"
                        if real in walked
                        else f"outside its class folder {entry.path}"
                    )
                    logger.warning(
                        "folder: skipping %s: it leads to %s, %s; images are read once, from "
                        "inside their class folder: move or copy them there if they belong",
                        sub,
                        real,
                        why,
                    )
                    continue
                walked.add(real)
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, f)
                real = os.path.realpath(path)
                # Checked first: a link to /dev/urandom or a FIFO is an error, wherever it is.
                problem = file_problem(real)
                if problem is not None:
                    if os.path.islink(path):
                        problem = f"it links to {real}, {problem}"
                    _bad_entry(path, problem, skip_bad_images)
                    continue
                if not _inside(real, class_dir):
                    logger.warning(
                        "folder: skipping %s: it links to %s, outside its class folder %s; "
                        "copy the image into the class folder if it belongs there",
                        path,
                        real,
                        entry.path,
                    )
                    continue
                if real in owner:  # a second link to one image: keep it once
                    if owner[real] != entry.name:
                        logger.warning(
                            "folder: skipping %s: the image %s is already listed under class %r",
                            path,
                            real,
                            owner[real],
                        )
                    continue
                owner[real] = entry.name
                files.append(real)
        out[entry.name] = files
    return out


def load_folder(root: Path, *, skip_bad_images: bool = False) -> Annotations:
    """One sub-folder per class under ``train/`` and ``test/`` (optional ``val/``).

    Classes are the sorted folder names of ``train/``; ``test/`` and ``val/`` may only use
    those names. Images are files with a known extension, searched recursively
    (see :func:`_scan_class_dir` for links and files that are not images).
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
        s: _scan_class_dir(root / s, skip_bad_images)
        for s in ("train", "val", "test")
        if (root / s).is_dir()
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
                f"folder: {root / split} has class folders not in train/: {unknown[:5]}; "
                "rename them to a class of train/ or add that class to train/"
            )
        return [Record(p, index_of[c]) for c, paths in scanned[split].items() for p in paths]

    train = records("train")
    empty = [c for c in classes if not scanned["train"][c]]
    if empty:
        raise DatasetRootError(
            f"folder: class folders without images under {root / 'train'}: {empty[:5]} "
            f"(image extensions: {', '.join(IMAGE_EXTENSIONS)}; links that lead out of the "
            "class folder are not followed): put the class's images in them or remove them"
        )
    val = records("val") if "val" in scanned else None
    return Annotations("folder", root, classes, train, records("test"), val, train if val else None)


def _read_csv_rows(path: Path) -> tuple[list[dict[str, str]], bool]:
    """Rows as dicts with keys path/label/line[/split]; also whether a split column exists.

    ``line`` is the row's line number in the file, for messages.
    """
    text = read_utf8(path, "save it as UTF-8, e.g. iconv -f latin1 -t utf-8 old.csv > new.csv",
                     prefix="csv: ", bom=True)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    numbered: list[tuple[int, list[str]]] = []
    try:
        # line_num, not a row counter: blank lines and quoted line breaks are skipped over.
        numbered.extend((reader.line_num, r) for r in reader if r and any(c.strip() for c in r))
    except csv.Error as err:
        raise DatasetRootError(f"csv: {path}:{reader.line_num}: {err}; fix that row") from err
    if not numbered:
        raise DatasetRootError(f"csv: {path} is empty.\n{CSV_LAYOUT}")
    head = [c.strip().lower() for c in numbered[0][1]]
    path_names = {"path", "file", "filename", "image", "image_path", "filepath"}
    label_names = {"label", "class", "class_name", "target", "category"}
    if set(head) & path_names:
        pcol = next(i for i, c in enumerate(head) if c in path_names)
        lcols = [i for i, c in enumerate(head) if c in label_names]
        if not lcols:
            raise DatasetRootError(
                f"csv: {path} has a header but no label column: {numbered[0][1]}; name it "
                f"one of {', '.join(sorted(label_names))}"
            )
        scols = [i for i, c in enumerate(head) if c == "split"]
        cols, body = (pcol, lcols[0], scols[0] if scols else None), numbered[1:]
    else:
        cols, body = (0, 1, 2 if len(numbered[0][1]) >= 3 else None), numbered
    pcol, lcol, scol = cols
    out = []
    for lineno, r in body:
        if len(r) <= max(c for c in cols if c is not None) or not r[pcol].strip():
            raise DatasetRootError(f"csv: {path}:{lineno}: expected path,label[,split], got {r}")
        if not r[lcol].strip():
            raise DatasetRootError(f"csv: {path}:{lineno}: the label is empty; fill it in")
        row = {"path": r[pcol].strip(), "label": r[lcol].strip(), "line": str(lineno)}
        if scol is not None:
            row["split"] = r[scol].strip().lower()
        out.append(row)
    return out, scol is not None


def _is_id(label: str) -> bool:
    """Whether a label is an integer class id (digits only) rather than a class name."""
    return label.lstrip("-").isdigit()


def _check_label_kinds(rows: list[tuple[Path, dict[str, str]]]) -> bool:
    """Whether the labels are integer ids; raise if ids and names are mixed.

    Ids are compared as numbers (``01`` is class 1) and names as text, so in a mix the
    same class could be written two ways and one of them would look unknown.
    """
    ids = [(f, r) for f, r in rows if _is_id(r["label"])]
    if not ids or len(ids) == len(rows):
        return bool(ids)
    (f1, r1), (f2, r2) = ids[0], next((f, r) for f, r in rows if not _is_id(r["label"]))
    raise DatasetRootError(
        f"csv: the labels mix integer class ids ({r1['label']!r} at {f1}:{r1['line']}, "
        f"{len(ids)} row(s)) and class names ({r2['label']!r} at {f2}:{r2['line']}, "
        f"{len(rows) - len(ids)} row(s)); use one kind in every row: all class names, or all "
        "integer ids (a label of digits only is read as an id)"
    )


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
    splits: dict[str, list[tuple[Path, dict[str, str]]]] = {"train": [], "val": [], "test": []}
    if has_split:
        for r in rows:
            s = {"trainval": "train", "validation": "val", "valid": "val"}.get(
                r["split"], r["split"]
            )
            if s not in splits:
                raise DatasetRootError(
                    f"csv: {root}:{r['line']}: unknown split {r['split']!r}; use train, val or test"
                )
            splits[s].append((root, r))
    else:
        splits["train"] = [(root, r) for r in rows]
        test_path = Path(test_csv) if test_csv is not None else None
        if test_path is None and "train" in root.name:
            sibling = root.with_name(root.name.replace("train", "test"))
            test_path = sibling if sibling.is_file() else None
        if test_path is not None:
            if not test_path.is_file():
                raise DatasetRootError(f"csv: test_csv {test_path} does not exist")
            test_rows, _ = _read_csv_rows(test_path)
            splits["test"] = [(test_path, r) for r in test_rows]
    if not splits["train"]:
        raise DatasetRootError(f"csv: {root} has no training rows.\n{CSV_LAYOUT}")
    numeric = _check_label_kinds([fr for rs in splits.values() for fr in rs])
    labels = {r["label"] for _, r in splits["train"]}
    classes = [str(v) for v in sorted({int(lab) for lab in labels})] if numeric else sorted(labels)
    index_of = {c: i for i, c in enumerate(classes)}

    def records(split: str) -> list[Record]:
        out = []
        for file, r in splits[split]:
            label = str(int(r["label"])) if numeric else r["label"]
            if label not in index_of:
                raise DatasetRootError(
                    f"csv: {file}:{r['line']}: {split} label {r['label']!r} never occurs in "
                    "the training rows, so the model has no class for it; add training rows "
                    "of that class or fix the label"
                )
            # Links in the row's own path stay unresolved: messages name what the CSV says.
            out.append(Record(str(file.parent.resolve() / r["path"]), index_of[label]))
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
