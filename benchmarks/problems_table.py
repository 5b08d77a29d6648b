"""The table of several validation problems: each setting's accuracy, paired by problem.

Reads the runs of ``benchmarks/class_subsets.py``'s problems, laid out as
``RUNS/<setting>/problem-<j>/metrics.json`` (``crasmra fit ... --trainer.default_root_dir
RUNS/<setting>/problem-<j>``), and the anchors of ``benchmarks/ncm_probe.py`` on each problem
(``ANCHORS/anchors-problem-<j>.json``). Prints two markdown tables: every setting's combined
top-1 on the held-out photos (mean ± sample std over the problems it finished, the lowest,
and in how many problems it is under the nearest class mean), then every setting minus each
reference, paired by problem (mean and 95% Student-t interval over the problems both
finished; the same code as the sweep reports' paired differences).

Example::

    python benchmarks/problems_table.py --runs runs/valbed-related-runs \\
        --anchors runs/valbed-related-anchors --compare-to baseline cra-smra
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from crasmra.sweep.report import mean_std, paired_difference

METRIC = "test/combined_top1"
_PROBLEM = re.compile(r"problem-(\d+)$")


def read_runs(runs: Path) -> dict[str, dict[int, float]]:
    """setting -> problem -> combined top-1 (%) of every finished run under ``runs``."""
    table: dict[str, dict[int, float]] = {}
    for metrics in sorted(runs.glob("*/problem-*/metrics.json")):
        match = _PROBLEM.search(metrics.parent.name)
        value = json.loads(metrics.read_text()).get("test", {}).get(METRIC)
        if match is None or value is None:
            continue  # not finished, or not a problem's folder
        table.setdefault(metrics.parent.parent.name, {})[int(match.group(1))] = 100 * value
    return table


def read_anchors(anchors: Path) -> dict[str, dict[int, float]]:
    """``NCM`` and ``probe`` -> problem -> top-1 (%) on the pre-logits."""
    table: dict[str, dict[int, float]] = {"NCM": {}, "probe": {}}
    for path in sorted(anchors.glob("anchors-problem-*.json")):
        problem = int(path.stem.rsplit("-", 1)[1])
        prelogits = json.loads(path.read_text())["accuracy"]["prelogits"]
        table["NCM"][problem] = 100 * prelogits["ncm"]
        table["probe"][problem] = 100 * prelogits["linear_probe"]
    return table


def render(runs: dict[str, dict[int, float]], anchors: dict[str, dict[int, float]],
           compare_to: list[str]) -> str:
    """The two markdown tables."""
    ncm = anchors.get("NCM", {})
    everything = {**anchors, **runs}
    lines = ["| setting | problems | top-1 (mean ± std) | lowest | under the NCM |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, values in everything.items():
        if not values:
            continue
        mean, std = mean_std(list(values.values()))
        # Without anchors there is nothing to be under: a blank, not 0.
        compared = [j for j in values if j in ncm]
        under = sum(values[j] < ncm[j] for j in compared) if compared and name != "NCM" else ""
        lines.append(f"| {name} | {len(values)} | {mean:.1f} ± {std:.1f} | "
                     f"{min(values.values()):.1f} | {under} |")
    lines += ["", "| setting | minus | problems | mean | 95% CI |",
              "| --- | --- | ---: | ---: | --- |"]
    for reference in compare_to:
        if reference not in everything:
            continue
        for name, values in everything.items():
            if name == reference:
                continue
            diff = paired_difference(values, everything[reference])
            if diff["mean"] is None:
                continue
            interval = ("n/a" if diff["ci_low"] is None
                        else f"[{diff['ci_low']:+.1f}, {diff['ci_high']:+.1f}]")
            lines.append(f"| {name} | {reference} | {diff['n']} | {diff['mean']:+.1f} | "
                         f"{interval} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True,
                        help="RUNS/<setting>/problem-<j>/metrics.json")
    parser.add_argument("--anchors", type=Path, default=None,
                        help="ANCHORS/anchors-problem-<j>.json of benchmarks/ncm_probe.py")
    parser.add_argument("--compare-to", nargs="*", default=["NCM"],
                        help="the references of the paired table (settings or NCM / probe)")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    if not runs:
        parser.error(f"no finished run under {args.runs} (expected "
                     "<setting>/problem-<j>/metrics.json)")
    anchors = read_anchors(args.anchors) if args.anchors is not None else {}
    print(render(runs, anchors, args.compare_to))
    return 0


if __name__ == "__main__":
    sys.exit(main())
