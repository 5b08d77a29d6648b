"""Running a sweep: each planned run in this process or in a child, resumable."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from crasmra.config import load_config
from crasmra.files import check_output, same_file, write_json, write_text
from crasmra.flag_moves import flat_model_section
from crasmra.metric_names import TEST_COMBINED_TOP1
from crasmra.sweep.plan import (
    RunSpec,
    fit_args,
    is_finished,
    plan_runs,
    read_metrics,
    select_grids,
)
from crasmra.sweep.spec import RUN_FILE, SweepError, SweepSpec, canonical

__all__ = [
    "CHILD_COMMAND",
    "RUN_CONFIG",
    "base_fingerprint",
    "check_same_base",
    "record_spec",
    "run_sweep",
    "validate_settings",
]

#: The file in each run folder holding the run's whole ``crasmra fit`` config.
RUN_CONFIG = "sweep_config.yaml"


def record_spec(spec: SweepSpec, out: Path, echo: Callable[[str], None] = print) -> None:
    """Write the sweep as run to ``out/sweep.yaml``, atomically, never over an input.

    When ``out/sweep.yaml`` is the sweep file itself (``--config d/sweep.yaml --out d``) it is
    left as the user wrote it, comments and all.

    Raises:
        UsageError: ``out/sweep.yaml`` is another input of the sweep (its base config) or a
            checkpoint, a copy or a link (see :func:`crasmra.files.check_output`).
    """
    from crasmra.sweep.report import spec_inputs

    record = out / "sweep.yaml"
    if spec.source is not None and same_file(record, spec.source):
        echo(f"{record} is the sweep file itself: left as it is.")
        return
    check_output(record, "--out", inputs=spec_inputs(spec))
    write_text(record, yaml.safe_dump(spec.to_dict(), sort_keys=False))


def base_fingerprint(base: str | dict[str, Any]) -> str:
    """A hash of the base config's content (``__base__`` chains merged), not of its path."""
    import hashlib

    if isinstance(base, str):
        base = load_config(base)
    # The model section in its flat layout from before the parts: a base config whose keys
    # moved, values unchanged, is the same base.
    text = json.dumps(canonical(flat_model_section(base)), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def check_same_base(spec: SweepSpec, out: Path, runs: Sequence[RunSpec]) -> None:
    """Refuse an output folder whose runs were trained from another base config.

    Run folders are named after their overrides only; skipping a finished run trained from a
    different base would silently mix two experiments in one table.

    Raises:
        SweepError: Some run in ``out`` records another base config fingerprint.
    """
    current = base_fingerprint(spec.base)
    for run in runs:
        try:
            recorded = json.loads((out / run.folder / RUN_FILE).read_text()).get("base_fingerprint")
        except (OSError, json.JSONDecodeError):
            continue
        if recorded not in (None, current):
            raise SweepError(
                f"{out / run.folder} was trained from a different base config than {spec.title!r} "
                "now has; use another --out, or delete that folder to retrain it."
            )


def validate_settings(spec: SweepSpec, runs: Sequence[RunSpec], extra: Sequence[str] = ()) -> None:
    """Parse every distinct setting's config with the `crasmra fit` parser, instantiating
    nothing.

    Catches misspelt keys and values of the wrong type before any run starts.

    Raises:
        SweepError: A setting does not parse; the message names the setting and the parser's error.
    """
    from jsonargparse import ArgumentError

    from crasmra.data import FGVCDataModule
    from crasmra.engine import CRASMRAModule
    from crasmra.flags import check_class_paths
    from crasmra.lightning_private import ParseOnly
    from crasmra.runner import make_cli_class

    class _ParseOnly(ParseOnly, make_cli_class()):  # type: ignore[misc]
        """The fit command's parser (same class, same links) with every action removed."""

    # Errors are raised as ArgumentError instead of printed before an exit.
    no_exit = {"exit_on_error": False, "fit": {"exit_on_error": False}}
    base = load_config(spec.base) if isinstance(spec.base, str) else spec.base
    seen: set[str] = set()
    cli = None
    for run in runs:
        if run.setting_name in seen:
            continue
        seen.add(run.setting_name)
        args = fit_args(run.fit_config(base, Path("sweep-validation")), extra)
        check_class_paths(args)
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                # The sweep's own command line is in sys.argv; the fit arguments are not from it.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                if cli is None:
                    cli = _ParseOnly(CRASMRAModule, FGVCDataModule, args=args,
                                     parser_kwargs=no_exit)
                else:  # building the parser is the slow part: parse with the same one
                    cli.parser.parse_args(args)
        except ArgumentError as err:
            raise SweepError(
                f"setting {run.setting_name} does not parse as `crasmra fit` arguments: {err}"
            ) from None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def _run_in_process(args: list[str]) -> None:
    """Run one fit in this process; a Ctrl-C that Lightning absorbed is raised again."""
    from crasmra.runner import run_lightning

    # The folder already holds the sweep's own sweep_run.json; nothing of Lightning's is lost.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* is not empty")
    handler = signal.getsignal(signal.SIGINT)
    try:
        run_lightning(args)
    finally:
        # On Ctrl-C Lightning ignores further SIGINTs and exits with status 1; a sweep must
        # stop there instead of treating it as one failed run and starting the next.
        interrupted = (signal.getsignal(signal.SIGINT) == signal.SIG_IGN
                       and handler != signal.SIG_IGN)
        if interrupted:
            signal.signal(signal.SIGINT, handler)
    if interrupted:
        raise KeyboardInterrupt


#: Starts ``crasmra.cli`` in a child Python without the working folder on its import path:
#: ``python -m`` puts the working folder first, so a ``timm.py`` or ``torch.py`` lying there
#: would be imported instead of the library. ``-P`` (Python 3.11+) leaves it out; before 3.11
#: the path entry is removed before anything is imported.
CHILD_COMMAND: tuple[str, ...] = (
    (sys.executable, "-P", "-m", "crasmra.cli")
    if sys.version_info >= (3, 11)
    else (sys.executable, "-c",
          "import sys; del sys.path[0]; from crasmra.cli import main; sys.exit(main())")
)


def _run_subprocess(args: list[str], log_path: Path) -> None:
    """Run one fit in a child process (:data:`CHILD_COMMAND`), its output in ``log_path``."""
    with log_path.open("a") as log_file:
        proc = subprocess.run([*CHILD_COMMAND, *args], stdout=log_file,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`crasmra fit` exited with status {proc.returncode}; see {log_path}")


def _clean_for_fresh_start(run_dir: Path) -> None:
    # metrics.json is merged into, not replaced, by the callback that writes it: a failed
    # attempt's entries must not leak into the new run.
    for name in ("metrics.json", "error.txt"):
        (run_dir / name).unlink(missing_ok=True)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    extra_args: Sequence[str] = (),
    groups: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    dry_run: bool = False,
    validate: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every unfinished run of a sweep into ``out``.

    Args:
        spec: The sweep.
        out: Output folder; run folders go to ``out/runs``.
        extra_args: ``crasmra fit`` flags added to every run that do not change its result
            (``--data.root``, ``--trainer.devices``...); they are not part of a run's identity.
        groups: Only run these grids (default: all).
        seeds: Only run these of the sweep's seeds (default: all). Processes or machines that
            share ``out`` can each take some seeds: their runs are disjoint, and run folders
            are named as in the whole sweep.
        dry_run: List what would run, run nothing.
        validate: Parse every setting with the fit parser before running anything.
        echo: Where progress lines go.

    Returns:
        ``{"runs": n, "finished": n, "ran": n, "failed": [folders], "wall_s": seconds}``.
    """
    out = Path(out)
    spec = select_grids(spec, groups)
    runs, _ = plan_runs(spec)
    if seeds is not None:
        wanted = list(seeds)
        unknown = sorted(set(wanted) - set(spec.seeds))
        if unknown:
            raise SweepError(f"seed(s) {unknown} are not in the sweep's seeds {spec.seeds}.")
        runs = [run for run in runs if run.seed in wanted]
    if validate:
        validate_settings(spec, runs, extra_args)
    check_same_base(spec, out, runs)
    todo = [r for r in runs if not is_finished(out / r.folder)]
    n_settings, n_seeds = len({r.setting_name for r in runs}), len({r.seed for r in runs})
    echo(f"{spec.title}: {len(runs)} runs ({n_settings} settings x {n_seeds} seeds), "
         f"{len(runs) - len(todo)} already finished, {len(todo)} to run.")
    summary: dict[str, Any] = {"runs": len(runs), "finished": len(runs) - len(todo), "ran": 0,
                               "failed": [], "wall_s": 0.0}
    if dry_run:
        for run in todo:
            echo(f"  would run {run.folder}")
        return summary
    out.mkdir(parents=True, exist_ok=True)
    record_spec(spec, out, echo)
    # The base config read once, for every run: each run records this content's fingerprint,
    # so an edit of the config files while the sweep runs must not reach its later runs.
    base = load_config(spec.base) if isinstance(spec.base, str) else spec.base
    fingerprint = base_fingerprint(base)
    start = time.perf_counter()
    # The sweep's thread count reaches every run, whichever launcher starts it.
    threads = [f"--threads={spec.threads}"] if spec.threads is not None else []
    run_flags = [*extra_args, *threads]
    for i, run in enumerate(todo, 1):
        run_dir = (out / run.folder).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = spec.resume and (run_dir / "checkpoints" / "last.ckpt").is_file()
        if not resume:
            _clean_for_fresh_start(run_dir)
        # The run's whole config in its folder: `crasmra fit --config` with it (and the
        # sweep's --set flags) repeats the run on its own.
        config_file = run_dir / RUN_CONFIG
        write_text(config_file, yaml.safe_dump(
            run.fit_config(base, run_dir, resume=resume), sort_keys=False))
        args = fit_args(config_file, run_flags)
        record = {"setting": dict(run.overrides), "seed": run.seed, "args": args,
                  "base_fingerprint": fingerprint, "launcher": spec.launcher,
                  "resumed": resume, "status": "running"}
        write_json(run_dir / RUN_FILE, record)
        echo(f"[{i}/{len(todo)}] {run.folder}{' (resuming)' if resume else ''}")
        t0 = time.perf_counter()
        try:
            if spec.launcher == "in-process":
                _run_in_process(args)
            else:
                _run_subprocess(args, run_dir / "sweep.log")
            if not is_finished(run_dir):
                raise RuntimeError("the run ended without test results in metrics.json")
        except KeyboardInterrupt:
            record.update(status="interrupted", wall_s=round(time.perf_counter() - t0, 1))
            write_json(run_dir / RUN_FILE, record)
            echo("Interrupted: run the same command again to continue the sweep.")
            raise
        except (Exception, SystemExit) as err:  # one failed run must not end the sweep
            wall = round(time.perf_counter() - t0, 1)
            write_text(run_dir / "error.txt", "".join(traceback.format_exception(err)))
            record.update(status="failed", wall_s=wall, error=f"{type(err).__name__}: {err}")
            write_json(run_dir / RUN_FILE, record)
            summary["failed"].append(str(run.folder))
            echo(f"    FAILED after {wall:.0f} s: {type(err).__name__}: {err} "
                 f"(traceback in {run_dir / 'error.txt'})")
            continue
        wall = round(time.perf_counter() - t0, 1)
        record.update(status="finished", wall_s=wall)
        write_json(run_dir / RUN_FILE, record)
        if not spec.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        summary["ran"] += 1
        test = (read_metrics(run_dir) or {}).get("test", {})
        combined = test.get(TEST_COMBINED_TOP1)
        score = f", test combined top-1 {100 * combined:.1f}%" if combined is not None else ""
        echo(f"    finished in {wall:.0f} s{score}")
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return summary
