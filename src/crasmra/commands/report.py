"""``crasmra report CKPT --out DIR``: accuracy, confusions and calibration on a dataset split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from crasmra.cpu import add_threads_option
from crasmra.errors import UsageError

USAGE = "crasmra report CHECKPOINT --out DIR"
#: The files ``crasmra report`` writes into its output folder.
OUTPUT_FILES = ("report.md", "report.json", "reliability.png", "confusion_matrix.png")


def register(subparsers: Any) -> None:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="evaluate a checkpoint on a dataset split and write report.md/.json and plots",
        description="Top-1/top-5 of every head and of the combined prediction, per-class "
        "accuracy, the most confused class pairs, expected calibration error with a "
        "reliability diagram, and a confusion matrix. The dataset defaults to the checkpoint's "
        "own (recorded in the checkpoint or in its run folder's config.yaml).",
    )
    p.add_argument("checkpoint", help="checkpoint (.ckpt) or .safetensors export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=None,
                   help="dataset name (cub, aircraft, cars, dogs, folder, csv, synthetic); "
                   "default: the checkpoint's")
    p.add_argument("--root", default=None, help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split to evaluate (default: test)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, repeatable (YAML value, e.g. level=family)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="image decoding processes (default: 0)")
    p.add_argument("--bins", type=int, default=15,
                   help="confidence bins of the calibration error (default: 15)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=run)


def _options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from crasmra.config import load_yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {pair!r}.")
        try:
            options[key] = load_yaml(value, f"--option {key}")
        except yaml.YAMLError as err:
            raise UsageError(f"--option {pair!r}: the value is not valid YAML ({err}).") from err
    return options


def _data_config(ns: argparse.Namespace) -> dict[str, Any]:
    from crasmra.inference import run_dataset_config

    saved = run_dataset_config(ns.checkpoint) or {}
    if ns.data is None and not saved:
        raise UsageError(
            f"{ns.checkpoint} does not say which dataset it was trained on (no data settings "
            "in the checkpoint, no config.yaml in its run folder); pass --data NAME --root PATH."
        )
    if ns.data is not None and ns.data != saved.get("dataset"):
        # Another dataset: nothing of the saved one applies.
        saved = {}
    data = {**saved, "dataset": ns.data or saved["dataset"]}
    if ns.root is not None:
        data["root"] = ns.root
    data["options"] = {**(data.get("options") or {}), **_options(ns.option)}
    return data


def _test_only_folder(data: dict[str, Any], split: str) -> Path | None:
    """The root of a ``folder`` dataset with a ``test/`` but no ``train/`` folder, when the
    test split is evaluated: the checkpoint's class names stand in for ``train/``'s."""
    if data["dataset"] != "folder" or split != "test" or data.get("root") is None:
        return None
    root = Path(data["root"]).expanduser()
    return root if (root / "test").is_dir() and not (root / "train").is_dir() else None


def run(ns: argparse.Namespace) -> int:
    """Handler of ``crasmra report``."""
    from crasmra.checkpoint import check_checkpoint_argument
    from crasmra.cpu import configure_cpu
    from crasmra.data import DatasetRootError, dataset_classes
    from crasmra.data.factory import create_labelled_test_folder
    from crasmra.files import check_output, check_writable, replacing
    from crasmra.inference import (
        build_eval_dataset,
        check_report_size,
        compute_report,
        evaluate,
        load_model,
        resolve_device,
        write_report,
    )
    from crasmra.metric_names import COMBINED
    from crasmra.viz import plot_confusion_matrix, plot_reliability

    # Arguments and outputs are checked before the data and the model are read.
    resolve_device(ns.device)
    check_checkpoint_argument(ns.checkpoint, USAGE)
    check_writable(ns.out, "--out", folder=True)
    out = Path(ns.out)
    for name in OUTPUT_FILES:
        check_output(out / name, "--out", inputs=[ns.checkpoint])
    data = _data_config(ns)
    options = dict(data.get("options") or {})
    test_only = _test_only_folder(data, ns.split)
    classes = None
    if test_only is None:
        try:
            classes = dataset_classes(data["dataset"], data.get("root"),
                                      **{k: v for k, v in options.items() if k != "bbox_crop"})
        except DatasetRootError as err:
            if ns.root is None and data.get("root") is not None:
                raise UsageError(
                    f"{err}\nThat root was recorded when the checkpoint was trained; pass "
                    "--root PATH to where the dataset is on this machine."
                ) from err
            raise
    model = load_model(ns.checkpoint, device=ns.device,
                       num_classes=len(classes) if classes is not None else None)
    # Before any image is read: the K x K matrix and the probabilities must fit.
    check_report_size(0, model.num_classes, len(model.head_names))
    workers = configure_cpu(ns.device, ns.num_workers, ns.threads).workers
    if classes is not None and list(classes) != list(model.classes):
        print(f"crasmra: warning: the dataset's class names differ from the checkpoint's; labels "
              f"are matched by index (dataset: {classes[:3]}..., checkpoint: "
              f"{model.classes[:3]}...).", file=sys.stderr)
    if test_only is not None:
        dataset = create_labelled_test_folder(test_only, model.classes, model.transform)
    else:
        dataset = build_eval_dataset(model, data, ns.split)
    check_report_size(len(dataset), model.num_classes, len(model.head_names))

    bar = None
    if not ns.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), unit="img", desc=f"report {ns.split}", file=sys.stderr,
                   disable=None)
    try:
        outputs = evaluate(model, dataset, batch_size=ns.batch_size, num_workers=workers,
                           progress=(lambda done, _: bar.update(done - bar.n)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    report = compute_report(outputs, model.classes, n_bins=ns.bins)
    # Each file is written under a temporary name and renamed into place when complete.
    with replacing(out / "reliability.png") as tmp:
        plot_reliability(report["calibration"], tmp)
    with replacing(out / "confusion_matrix.png") as tmp:
        plot_confusion_matrix(report["confusion_matrix"], model.classes, tmp)
    figures = {"Reliability diagram": "reliability.png",
               "Confusion matrix": "confusion_matrix.png"}
    context = {"checkpoint": str(ns.checkpoint), "dataset": data["dataset"],
               "root": data.get("root"), "split": ns.split}
    md, _ = write_report(report, out, context=context, figures=figures)
    combined = report["heads"][COMBINED]
    print(f"{data['dataset']}/{ns.split}: {report['num_images']} images, combined top-1 "
          f"{100 * combined['top1']:.2f}%, ECE {100 * report['calibration']['ece']:.2f}% "
          f"-> {md}")
    return 0
