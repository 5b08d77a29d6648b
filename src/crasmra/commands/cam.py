"""``crasmra cam CKPT IMAGE... --out DIR``: Grad-CAM / activation-map grids per image."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from crasmra.cpu import add_threads_option


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


def run(ns: argparse.Namespace) -> int:
    """Handler of ``crasmra cam``."""
    from crasmra.cpu import configure_cpu
    from crasmra.data import ImageLoadError
    from crasmra.inference import Failure, find_images, load_model, load_smram
    from crasmra.viz import explain_image, true_label_from_path, unique_names

    files, failures = find_images(ns.images)
    model = load_model(ns.checkpoint, device=ns.device)
    smram = load_smram(ns.checkpoint, model) if ns.train_maps else None
    configure_cpu(ns.device, 0, ns.threads)
    written = 0
    for path, name in zip(files, unique_names(files), strict=True):
        try:
            result = explain_image(model, path, ns.out, name=name, smram=smram,
                                   true_label=true_label_from_path(path, model.classes))
        except ImageLoadError as err:
            failures.append(Failure(str(path), err.reason))
            continue
        written += 1
        extra = f" and {result.importance}" if result.importance else ""
        print(f"{path}: predicted {result.predicted} ({100 * result.probability:.1f}%) "
              f"-> {result.grid}{extra}")
    for failure in failures:
        print(f"crasmra: skipped {failure.path}: {failure.reason}", file=sys.stderr)
    if not written:
        print("crasmra: error: no image could be read.", file=sys.stderr)
        return 1
    return 0
