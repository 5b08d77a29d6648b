"""``crasmra sweep``: run a grid of fits from a sweep file and write tables and plots."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from crasmra.cpu import add_threads_option
from crasmra.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of fits (variants, delta, gamma, seeds...) and tabulate mean ± std",
        description=(
            "Run every run of a sweep file that is not finished in --out (a stopped sweep "
            "continues), then write results.md, results.json and plots/ (mean ± std over seeds). "
            "The file format is described in EXPERIMENTS.md, \"The sweep file\"."
        ),
    )
    parser.add_argument("--config", required=True, metavar="SWEEP.yaml", help="the sweep file")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder; run folders go to DIR/runs")
    parser.add_argument("--report", metavar="DIR",
                        help="where results.md, results.json and plots/ go (default: --out)")
    parser.add_argument("--grid", action="append", metavar="NAME",
                        help="only this grid of the sweep file (repeatable)")
    parser.add_argument("--seed", action="append", type=int, metavar="N", dest="seeds",
                        help="only this seed of the sweep file (repeatable): processes or "
                             "machines sharing --out can each run some seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a fit flag for every run that does not change results, e.g. "
                             "data.root=/data/CUB_200_2011 or trainer.devices=4 (repeatable); "
                             "not part of a run's identity, so finished runs are still skipped")
    parser.add_argument("--launcher", choices=("in-process", "subprocess"),
                        help="override the sweep file's launcher")
    add_threads_option(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the sweep and list the runs still to do; run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; write the report from the runs finished so far")
    parser.set_defaults(func=_cmd_sweep)


def _set_flags(items: list[str]) -> list[str]:
    from crasmra.sweep import SweepError, check_key

    flags = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep:
            raise UsageError(f"--set {item}: write KEY=VALUE, e.g. --set data.root=/data/cub.")
        try:
            check_key(key, f"--set {item}")
        except SweepError as err:
            raise UsageError(str(err)) from None
        flags.append(f"--{key}={value}")
    return flags


def _cmd_sweep(ns: argparse.Namespace) -> int:
    from crasmra.files import check_output, same_file
    from crasmra.runfolder import create_run_folder
    from crasmra.sweep import SweepError, load_sweep, run_sweep, select_grids, write_report
    from crasmra.sweep.report import check_report_files, spec_inputs

    extra = _set_flags(ns.set)
    try:
        spec = load_sweep(ns.config)
        if ns.launcher:
            spec = replace(spec, launcher=ns.launcher)
        if ns.threads is not None:
            spec = replace(spec, threads=ns.threads)
        out = Path(ns.out)
        report = Path(ns.report) if ns.report else out
        # Before any run: nothing this sweep writes may land on its inputs or a checkpoint.
        check_report_files(select_grids(spec, ns.grid), report,
                           "--report" if ns.report else "--out")
        if not same_file(out / "sweep.yaml", ns.config):
            check_output(out / "sweep.yaml", "--out", inputs=spec_inputs(spec))
        summary = None
        if not ns.report_only:
            if not ns.dry_run:
                create_run_folder(out, "--out")
            start = time.perf_counter()
            summary = run_sweep(spec, out, extra_args=extra, groups=ns.grid, seeds=ns.seeds,
                                dry_run=ns.dry_run)
            if ns.dry_run:
                return 0
            print(f"Ran {summary['ran']} runs in {time.perf_counter() - start:.0f} s "
                  f"({summary['finished']} were already finished).")
        results = write_report(spec, out, report, groups=ns.grid)
    except SweepError as err:
        raise UsageError(str(err)) from None
    print(f"{results['runs_finished']} of {results['runs_planned']} runs finished. "
          f"Report: {report / 'results.md'}")
    if summary and summary["failed"]:
        print(f"{len(summary['failed'])} runs failed (see error.txt in each):")
        for folder in summary["failed"]:
            print(f"  {out / folder}")
        return 1
    return 0
