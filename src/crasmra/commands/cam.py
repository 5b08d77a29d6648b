"""``crasmra cam CKPT IMAGE... --out DIR``: Grad-CAM / activation-map grids per image."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from crasmra.cpu import add_threads_option

USAGE = "crasmra cam CHECKPOINT IMAGE... --out DIR"
#: The files ``crasmra cam`` writes per image (see crasmra.viz.explain_image).
OUTPUT_SUFFIXES = ("_cam.png", "_importance.png")


def register(subparsers: Any) -> None:
    """Add the ``cam`` subcommand."""
    p = subparsers.add_parser(
        "cam",
        help="draw Grad-CAM and activation maps of every attended stage",
        description="For each image, write <name>_cam.png: per attended stage the Grad-CAM of "
        "the predicted class and the channel-mean activation map (the paper's Figure 4) over "
        "the image, and <name>_importance.png: CRAM's channel importance per stage. A plain "
        "checkpoint has one column, the last stage as timm's classifier reads it. An image "
        "in a folder named after a class is titled with that true class.",
    )
    p.add_argument("checkpoint", help="checkpoint (.ckpt) or .safetensors export")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or globs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-maps", action="store_true",
                   help="also draw SMRAM's spatial attention (needs a cra-smra training .ckpt)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add_threads_option(p)
    p.set_defaults(func=run)


def _publish(staged: Path, out: Path) -> Path:
    # A rename within one filesystem: a reader never sees a half-written picture.
    target = out / staged.name
    os.replace(staged, target)
    return target


def run(ns: argparse.Namespace) -> int:
    """Handler of ``crasmra cam``."""
    from crasmra.checkpoint import check_checkpoint_argument
    from crasmra.cpu import configure_cpu
    from crasmra.data import ImageLoadError
    from crasmra.errors import printable
    from crasmra.files import check_output, check_writable
    from crasmra.inference import Failure, find_images, load_model, load_smram, resolve_device
    from crasmra.viz import explain_image, true_label_from_path, unique_names

    # Arguments and outputs are checked before the model is loaded.
    resolve_device(ns.device)
    check_checkpoint_argument(ns.checkpoint, USAGE)
    check_writable(ns.out, "--out", folder=True)
    out = Path(ns.out)
    files, failures = find_images(ns.images)
    names = unique_names(files)
    for name in names:
        for suffix in OUTPUT_SUFFIXES:
            check_output(out / f"{name}{suffix}", "--out", inputs=[ns.checkpoint, *files])
    model = load_model(ns.checkpoint, device=ns.device)
    smram = load_smram(ns.checkpoint, model) if ns.train_maps else None
    configure_cpu(ns.device, 0, ns.threads)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    # Each picture is drawn in a private folder next to its destination, then renamed into place.
    with tempfile.TemporaryDirectory(dir=out, prefix=".crasmra-cam-") as staging:
        for path, name in zip(files, names, strict=True):
            try:
                result = explain_image(model, path, staging, name=name, smram=smram,
                                       true_label=true_label_from_path(path, model.classes))
            except ImageLoadError as err:
                failures.append(Failure(str(path), err.reason))
                continue
            grid = _publish(result.grid, out)
            importance = _publish(result.importance, out) if result.importance else None
            written += 1
            extra = f" and {printable(str(importance))}" if importance else ""
            print(f"{printable(str(path))}: predicted {printable(result.predicted)} "
                  f"({100 * result.probability:.1f}%) -> {printable(str(grid))}{extra}")
    for failure in failures:
        print(f"crasmra: skipped {printable(failure.path)}: {printable(failure.reason)}",
              file=sys.stderr)
    if not written:
        print("crasmra: error: no image could be read.", file=sys.stderr)
        return 1
    return 0
