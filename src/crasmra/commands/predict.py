"""``crasmra predict CKPT IMAGE...``: top-k classes of image files, folders or globs."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Any

from crasmra.cpu import add_threads_option
from crasmra.errors import printable

FORMATS = ("table", "json", "csv")
USAGE = "crasmra predict CHECKPOINT IMAGE..."


def register(subparsers: Any) -> None:
    """Add the ``predict`` subcommand."""
    p = subparsers.add_parser(
        "predict",
        help="classify images with a trained checkpoint (top-k classes)",
        description="Classify images, folders (searched recursively) or glob patterns with the "
        "combined prediction (mean of the heads' softmaxes; a plain checkpoint's one "
        "classifier). Unreadable files are reported "
        "on stderr and skipped.",
    )
    p.add_argument("checkpoint", help="checkpoint (.ckpt) or .safetensors export")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files, folders or globs")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output format (default: table)")
    p.add_argument("--output", "-o", default=None, help="write to this file instead of stdout")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="image decoding processes (default: 0, in the main process)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=run)


def _progress(quiet: bool, batch_size: int) -> tuple[Any, Any]:
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        # A bar only when there is more than one batch: a single batch finishes at once.
        if quiet or total <= batch_size:
            return
        if "bar" not in state:
            from tqdm import tqdm

            state["bar"] = tqdm(total=total, unit="img", desc="predict", file=sys.stderr,
                                disable=None)
        state["bar"].update(done - state["bar"].n)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return update, close


def _table(result: Any) -> str:
    lines = []
    for pred in result.predictions:
        lines.append(printable(pred.path))
        for rank, (label, prob) in enumerate(zip(pred.labels, pred.probabilities, strict=True), 1):
            lines.append(f"  {rank}. {100 * prob:6.2f}%  {printable(label)}")
    return "\n".join(lines) + ("\n" if lines else "")


def _csv(result: Any) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "rank", "index", "label", "probability"])
    for pred in result.predictions:
        for row in pred.as_dict()["top_k"]:
            writer.writerow([pred.path, row["rank"], row["index"], row["label"],
                             f"{row['probability']:.6f}"])
    return buffer.getvalue()


def _json(result: Any) -> str:
    return json.dumps({
        "predictions": [p.as_dict() for p in result.predictions],
        "failures": [{"path": f.path, "reason": f.reason} for f in result.failures],
    }, indent=2) + "\n"


def run(ns: argparse.Namespace) -> int:
    """Handler of ``crasmra predict``."""
    from crasmra.checkpoint import check_checkpoint_argument
    from crasmra.cpu import configure_cpu
    from crasmra.errors import UsageError
    from crasmra.files import check_output, check_writable, write_text
    from crasmra.inference import find_images, load_model, predict, resolve_device

    # Everything that can be checked without the model is checked first: a bad argument must
    # not cost a model load, and a bad --output must not cost the predictions.
    if ns.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {ns.top_k}.")
    resolve_device(ns.device)
    check_checkpoint_argument(ns.checkpoint, USAGE)
    files, missing = find_images(ns.paths)
    if ns.output:
        check_writable(ns.output, "--output")
        check_output(ns.output, "--output", inputs=[ns.checkpoint, *files])
    model = load_model(ns.checkpoint, device=ns.device)
    workers = configure_cpu(ns.device, ns.num_workers, ns.threads).workers
    update, close = _progress(ns.quiet, ns.batch_size)
    try:
        result = predict(model, files, top_k=ns.top_k, batch_size=ns.batch_size,
                         num_workers=workers, progress=update)
    finally:
        close()
    result.failures[:0] = missing
    for failure in result.failures:
        print(f"crasmra: skipped {printable(failure.path)}: {printable(failure.reason)}",
              file=sys.stderr)
    text = {"table": _table, "json": _json, "csv": _csv}[ns.format](result)
    if ns.output:
        write_text(ns.output, text)  # atomic: an interrupted run leaves the old file whole
    else:
        sys.stdout.write(text)
    if not result.predictions:
        print("crasmra: error: no image could be read.", file=sys.stderr)
        return 1
    return 0
