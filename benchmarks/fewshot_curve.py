"""The few-shot curve: each recipe's test top-1 against photos per class, beside the anchors.

Reads a few-shot sweep's report (``results.json`` of ``crasmra sweep --report DIR`` on
``sweeps/cub100-fewshot.yaml``; several, the later replacing the earlier's runs) and the
anchors of ``benchmarks/ncm_probe.py`` for each subset (``anchors-k{N}.json``; the whole
training split's as ``--full-anchors FILE``), then writes
two markdown tables (stdout: the combined test top-1, mean ± sample std over seeds, beside the
anchors; each variant minus the nearest class mean, with the lowest seed's margin) and a plot:
the combined test top-1 of every variant (mean over seeds; a dot per seed) and the nearest
class mean and linear probe on the pre-logits, against the photos per class on a log axis.

Example::

    python benchmarks/fewshot_curve.py --results experiments/cub100-fewshot/results.json \\
        --anchors experiments/cub100-fewshot --full-anchors experiments/cub100/anchors.json \\
        --plot experiments/cub100-fewshot/plots/fewshot_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any

METRIC = "test/combined_top1"


def read_runs(results: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """variant -> photos per class -> the seeds' combined test top-1 (fractions)."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for grid in results["grids"]:
        for row in grid["rows"]:
            point = row["point"]
            variant = next((v for k, v in point.items() if k.endswith("variant")), None)
            shots = next((v for k, v in point.items() if k.endswith("train_per_class")), None)
            metric = row["metrics"].get(METRIC)
            if variant is None or shots is None or metric is None:
                continue
            curves[str(variant)][int(shots)] = list(metric["values"])
    return dict(curves)


def read_anchors(folder: Path, shots: list[int]) -> dict[int, dict[str, float]]:
    """photos per class -> {"ncm": ..., "linear_probe": ...} on the pre-logits."""
    anchors = {}
    for k in shots:
        path = folder / f"anchors-k{k}.json"
        if path.is_file():
            anchors[k] = _prelogit_anchors(json.loads(path.read_text()))
    return anchors


def _prelogit_anchors(data: dict[str, Any]) -> dict[str, float]:
    accuracy = data.get("accuracy", {}).get("prelogits", {})
    return {
        "ncm": float(accuracy.get("ncm", data.get("prelogits", float("nan")))),
        "linear_probe": float(accuracy.get("linear_probe", float("nan"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, type=Path, action="append",
                        help="the sweep's results.json; repeatable: a later file's runs "
                             "replace an earlier one's of the same variant and photos per "
                             "class (a sweep that reran only the runs a switch changes)")
    parser.add_argument("--anchors", required=True, type=Path,
                        help="folder with anchors-k{N}.json from benchmarks/ncm_probe.py")
    parser.add_argument("--full-anchors", type=Path, default=None,
                        help="anchors of the whole training split (the curve's last point)")
    parser.add_argument("--full-shots", type=int, default=30,
                        help="photos per class of the whole training split, for the x axis")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here")
    args = parser.parse_args(argv)

    curves: dict[str, dict[int, list[float]]] = {}
    for path in args.results:
        for variant, curve in read_runs(json.loads(path.read_text())).items():
            curves.setdefault(variant, {}).update(curve)
    shots = sorted({k for curve in curves.values() for k in curve})
    anchors = read_anchors(args.anchors, shots)
    if args.full_anchors is not None and args.full_anchors.is_file():
        anchors[args.full_shots] = _prelogit_anchors(json.loads(args.full_anchors.read_text()))
    variants = list(curves)

    def cell(values: list[float] | None) -> str:
        if not values:
            return ""
        if len(values) == 1:
            return f"{100 * values[0]:.1f}"
        return f"{100 * mean(values):.1f} ± {100 * stdev(values):.1f} (n={len(values)})"

    def margin(values: list[float] | None, anchor: float | None) -> str:
        # The lowest seed beside the mean: "never below the anchor" is a claim about every run.
        if not values or anchor is None or anchor != anchor:
            return ""
        low = f" (lowest {100 * (min(values) - anchor):+.1f})" if len(values) > 1 else ""
        return f"{100 * (mean(values) - anchor):+.1f}{low}"

    print("| photos per class | " + " | ".join(f"`{v}`" for v in variants)
          + " | NCM | linear probe |")
    print("| ---: |" + " ---: |" * (len(variants) + 2))
    for k in sorted(set(shots) | set(anchors)):
        a = anchors.get(k, {})
        print(f"| {k} | " + " | ".join(cell(curves[v].get(k)) for v in variants)
              + f" | {100 * a.get('ncm', float('nan')):.1f}"
              + f" | {100 * a.get('linear_probe', float('nan')):.1f} |")

    print("\nMinus the nearest class mean (percentage points; the mean over seeds, and the "
          "lowest seed's):\n")
    print("| photos per class | " + " | ".join(f"`{v}`" for v in variants) + " |")
    print("| ---: |" + " ---: |" * len(variants))
    for k in sorted(set(shots) & set(anchors)):
        ncm = anchors[k].get("ncm")
        print(f"| {k} | " + " | ".join(margin(curves[v].get(k), ncm) for v in variants) + " |")

    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant in variants:
            ks = sorted(curves[variant])
            means = [100 * sum(curves[variant][k]) / len(curves[variant][k]) for k in ks]
            (line,) = ax.plot(ks, means, marker="o", label=variant)
            for k in ks:
                ax.scatter([k] * len(curves[variant][k]), [100 * v for v in curves[variant][k]],
                           s=8, color=line.get_color(), alpha=0.5)
        for method, style in (("ncm", "--"), ("linear_probe", ":")):
            ks = sorted(k for k in anchors if anchors[k].get(method) == anchors[k].get(method))
            ax.plot(ks, [100 * anchors[k][method] for k in ks], style, color="black",
                    label="nearest class mean" if method == "ncm" else "linear probe")
        ax.set_xscale("log")
        ticks = sorted(set(shots) | set(anchors))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(k) for k in ticks])
        ax.set_xlabel("training photos per class")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nWrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
