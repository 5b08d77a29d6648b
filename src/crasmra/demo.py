"""The demo run: CRA-SMRA on the built-in synthetic set, on a CPU, in a few minutes.

``crasmra demo`` runs the package's ``demo.yaml`` (:data:`DEMO_CONFIG`) through the same
LightningCLI path as ``crasmra fit --config configs/demo.yaml``, whose one line names that file.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from crasmra.errors import UsageError
from crasmra.metric_names import heads_in, metric_name
from crasmra.runfolder import create_run_folder, refuse_earlier_run
from crasmra.runner import run_lightning

__all__ = ["DEMO_CONFIG", "format_results_table", "run_demo"]

#: The demo as a ``crasmra fit`` config, read from the package's ``demo.yaml`` (the file
#: explains its choices).
DEMO_CONFIG: dict[str, Any] = yaml.safe_load(files("crasmra").joinpath("demo.yaml").read_text())


def run_demo(
    out: str | Path,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    quiet: bool = False,
) -> None:
    """Train and test the demo into ``out`` and print its results table.

    Raises:
        UsageError: ``out`` cannot be written, holds an earlier run (without ``overwrite``),
            or ``epochs`` is below 1.
    """
    out = Path(out)
    create_run_folder(out, "--out")
    if not overwrite:
        try:
            refuse_earlier_run(out)
        except UsageError:
            raise UsageError(
                f"{out} holds an earlier demo run. Run `crasmra demo --overwrite` to replace it, "
                "or `crasmra demo --out DIR` to keep it and write elsewhere."
            ) from None
    args = [
        "fit",
        f"--config={yaml.safe_dump(DEMO_CONFIG)}",
        f"--trainer.default_root_dir={out}",
        f"--overwrite={str(overwrite).lower()}",
    ]
    if seed is not None:
        args.append(f"--seed_everything={seed}")
    if epochs is not None:
        if epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {epochs}.")
        args.append(f"--trainer.max_epochs={epochs}")
    if threads is not None:
        args.append(f"--threads={threads}")
    if quiet:
        args.append("--trainer.enable_progress_bar=false")
    start = time.perf_counter()
    cli = run_lightning(args, verbose_test=False)
    elapsed = time.perf_counter() - start
    print(format_results_table(out / "metrics.json", cli.datamodule.num_classes))
    print(f"\nWall time: {elapsed:.0f} s. Run folder: {out}")
    ckpt = cli.trainer.checkpoint_callback
    chosen_by = "by validation combined top-1" if ckpt.monitor else "the final epoch: no validation"
    print(f"Best checkpoint ({chosen_by}): {ckpt.best_model_path}")


def format_results_table(metrics_path: str | Path, num_classes: int) -> str:
    """A plain-text table of each head's and the combined accuracy beside chance level.

    The val column (the best epoch's validation accuracy) is left out for a run without a
    validation split, whose tested checkpoint is the final epoch.
    """
    data = json.loads(Path(metrics_path).read_text())
    test = data.get("test", {})
    best_val = (data.get("best_val") or {}).get("metrics", {})
    heads = heads_in(test, "test")
    chance = 100.0 / num_classes
    has_top5 = any(k.endswith("_top5") for k in test)
    header = f"{'head':<10}"
    header += f" {'val top-1':>10}" if best_val else ""
    header += f" {'test top-1':>11}"
    header += f" {'test top-5':>11}" if has_top5 else ""
    header += f" {'chance':>8}"
    lines = [header, "-" * len(header)]
    for head in heads:
        row = f"{head:<10}"
        if best_val:
            row += f" {100 * best_val.get(metric_name('val', head), float('nan')):>9.1f}%"
        row += f" {100 * test[metric_name('test', head)]:>10.1f}%"
        if has_top5:
            row += f" {100 * test.get(metric_name('test', head, 5), float('nan')):>10.1f}%"
        row += f" {chance:>7.1f}%"
        lines.append(row)
    return "\n".join(lines)
