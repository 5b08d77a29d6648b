"""``crasmra demo`` over seeds and thread counts: combined test top-1 and wall time of each run.

Runs ``crasmra demo --seed S --threads T`` one after another (never two at once, so that the
wall times are comparable) and prints a markdown table plus the mean, standard deviation and
spread (max - min) of the accuracy.

Example::

    python benchmarks/demo_robustness.py --seeds 0 1 2 3 4 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(seed: int, threads: int | None, out: Path) -> tuple[float, float]:
    """One demo run in a fresh process; returns (combined test top-1 in %, wall seconds)."""
    cmd = ["crasmra", "demo", "--quiet", "--overwrite", "--seed", str(seed), "--out", str(out)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return 100 * metrics["test"]["test/combined_top1"], wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to run (0: the default choice)")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="crasmra-demo-"))
    print(f"load average before the first run: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = []
    for threads in args.threads:
        for seed in args.seeds:
            acc, wall = run_demo(seed, threads or None, work / f"t{threads}-s{seed}")
            rows.append((seed, threads, acc, wall))
            print(f"seed {seed}, threads {threads or 'default'}: {acc:.1f}% in {wall:.0f} s",
                  file=sys.stderr, flush=True)
    print("| seed | threads | combined test top-1 | wall time |")
    print("| ---: | ---: | ---: | ---: |")
    for seed, threads, acc, wall in rows:
        print(f"| {seed} | {threads or 'default'} | {acc:.1f}% | {wall:.0f} s |")
    accs = [r[2] for r in rows]
    walls = [r[3] for r in rows]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\naccuracy: mean {statistics.mean(accs):.1f}%, std {std:.1f}, min {min(accs):.1f}%, "
          f"max {max(accs):.1f}%, spread {max(accs) - min(accs):.1f} points; "
          f"wall time {min(walls):.0f}-{max(walls):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
