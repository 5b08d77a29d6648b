"""Wall time of a crasmra command on a quiet machine and beside a competing copy of itself.

Each setting runs the command alone, then two copies at once on the same cores (the competing
CPU-bound job is a second copy of the same command), and prints a markdown table: wall time
alone, wall time of each copy under load, and the slowdown. The thread settings compared are
the default (chosen by ``crasmra.cpu``) and any ``--threads N`` given with ``--compare``.

Examples::

    python benchmarks/cpu_load.py --compare 2 -- crasmra demo --quiet
    python benchmarks/cpu_load.py --compare 2 -- crasmra fit --config configs/cub10/cra-smra.yaml \\
        --trainer.enable_progress_bar false --test_after_fit true

The command must accept ``--threads N``; ``{out}`` in it is replaced by a fresh folder per run
(``crasmra demo`` gets ``--out`` and ``crasmra fit`` ``--trainer.default_root_dir`` added when
the command names neither).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _command(base: list[str], threads: int | None, out: Path) -> list[str]:
    cmd = [part.replace("{out}", str(out)) for part in base]
    if not any("{out}" in part for part in base):
        if "demo" in base:
            cmd += ["--out", str(out)]
        elif "fit" in base:
            cmd += [f"--trainer.default_root_dir={out}", "--overwrite=true"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def _run_together(commands: list[list[str]], log: Path) -> list[float]:
    """Start the commands at once; return each one's wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    start = time.perf_counter()
    procs = []
    for i, cmd in enumerate(commands):
        handle = (log.parent / f"{log.stem}-{i}.log").open("w")
        procs.append(
            (subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env), handle)
        )
    times: list[float] = [0.0] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            proc, handle = procs[i]
            if proc.poll() is not None:
                times[i] = time.perf_counter() - start
                handle.close()
                pending.discard(i)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(commands[i])} failed; see {handle.name}")
        time.sleep(0.2)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compare",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also measure with --threads N (repeatable)",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep the run folders and logs here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    base = [c for c in args.command if c != "--"]
    if not base:
        parser.error("give the command after --")
    work = Path(args.keep or tempfile.mkdtemp(prefix="crasmra-load-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    rows = []
    for threads in [None, *args.compare]:
        label = "default" if threads is None else f"--threads {threads}"
        tag = "default" if threads is None else f"t{threads}"
        alone = _run_together(
            [_command(base, threads, work / f"{tag}-alone")], work / f"{tag}-alone"
        )[0]
        loaded = _run_together(
            [_command(base, threads, work / f"{tag}-loaded-{i}") for i in range(2)],
            work / f"{tag}-loaded",
        )
        rows.append((label, alone, loaded))
        print(
            f"{label}: alone {alone:.0f} s, two at once {loaded[0]:.0f} s / {loaded[1]:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    print(f"Command: `{' '.join(base)}`; load average before the first run: {load:.2f}\n")
    print("| threads | alone (s) | two at once (s) | slowdown |")
    print("| --- | ---: | ---: | ---: |")
    for label, alone, loaded in rows:
        print(
            f"| {label} | {alone:.0f} | {loaded[0]:.0f} / {loaded[1]:.0f} "
            f"| {max(loaded) / alone:.2f}x |"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
