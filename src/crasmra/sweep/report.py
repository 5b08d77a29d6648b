"""Reporting a sweep: mean and std over seeds, paired comparisons, tables and plots."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from crasmra.files import check_output, replacing, write_json, write_text
from crasmra.metric_names import COMBINED, MONITOR, TEST_COMBINED_TOP1, heads_in, metric_name
from crasmra.sweep.plan import plan_runs, read_metrics, select_grids, setting_key
from crasmra.sweep.spec import COMPARE_METRIC, VARIANT_KEY, Grid, SweepSpec, short_key

__all__ = [
    "aggregate",
    "build_results",
    "check_report_files",
    "collect",
    "format_comparison",
    "format_markdown",
    "format_table",
    "head_names",
    "mean_std",
    "paired_comparisons",
    "paired_difference",
    "report_files",
    "spec_inputs",
    "write_plots",
    "write_report",
]

# ---------------------------------------------------------------------------------------------
# Collecting and aggregating
# ---------------------------------------------------------------------------------------------
def collect(spec: SweepSpec, out: str | Path) -> dict[str, dict[int, dict[str, float]]]:
    """The finished runs' metrics: setting name -> seed -> flat metrics.

    The flat metrics are the test metrics (``test/...``) and the validation metrics of the
    best epoch (``val/...``), as fractions.
    """
    out = Path(out)
    runs, _ = plan_runs(spec)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        metrics = read_metrics(out / run.folder)
        if not metrics or not metrics.get("test"):
            continue
        flat = dict(metrics["test"])
        flat.update((metrics.get("best_val") or {}).get("metrics") or {})
        results.setdefault(run.setting_name, {})[run.seed] = flat
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Mean ± sample std over seeds of every metric: name -> {mean, std, n, values}."""
    names = sorted({k for metrics in per_seed.values() for k in metrics})
    summary = {}
    for name in names:
        seeds = sorted(s for s, m in per_seed.items() if name in m)
        values = [per_seed[s][name] for s in seeds]
        mean, std = mean_std(values)
        summary[name] = {"mean": mean, "std": std, "n": len(values), "seeds": seeds,
                         "values": values}
    return summary


def head_names(metric_names: Iterable[str]) -> list[str]:
    """Heads with a top-1 test metric, in the paper's column order: stages, concat, combined.

    The plain variant's one head ("classifier") sits after the stage heads, before concat.
    """
    return heads_in(metric_names, "test")


def paired_difference(values: dict[int, float], reference: dict[int, float],
                      level: float = 0.95) -> dict[str, Any]:
    """Mean paired difference ``values[s] - reference[s]`` over the seeds both have, with a CI.

    The interval is Student's t over the per-seed differences: ``mean ± t(1 - (1 - level) / 2,
    n - 1) * sd / sqrt(n)``, ``sd`` the sample standard deviation of the differences.

    Args:
        values: Seed -> metric of the compared setting.
        reference: Seed -> metric of the reference setting.
        level: Confidence level of the interval.

    Returns:
        ``{"n", "seeds", "differences", "mean", "std", "ci_low", "ci_high", "level"}``; ``mean``
        is None without a shared seed, ``std`` and the interval are None with fewer than two.
    """
    seeds = sorted(set(values) & set(reference))
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    result: dict[str, Any] = {"n": n, "seeds": seeds, "differences": diffs, "mean": None,
                              "std": None, "ci_low": None, "ci_high": None, "level": level}
    if n == 0:
        return result
    mean, std = mean_std(diffs)
    result["mean"] = mean
    if n >= 2:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
        result.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return result


def paired_comparisons(grid: Grid, rows: Sequence[tuple[dict[str, Any], str]],
                       collected: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    """Each setting of a variant grid against each reference variant, paired by seed.

    A row's reference is the grid point that differs from it only in ``model.net.variant``, so in
    a grid of variants x another key every value of that key is compared separately.

    Returns:
        One entry per reference: ``{"reference", "label", "metric", "rows"}``; each row holds
        ``label``, ``point``, ``setting``, ``reference_setting`` and, per metric both settings
        report, the :func:`paired_difference` (fractions, not percent).
    """
    names = {setting_key(point): name for point, name in rows}
    comparisons = []
    for ref in grid.compare_to:
        table = []
        for point, name in rows:
            if point.get(VARIANT_KEY) == ref:
                continue
            ref_name = names[setting_key({**point, VARIANT_KEY: ref})]
            mine, theirs = collected.get(name, {}), collected.get(ref_name, {})
            shared = sorted({k for m in mine.values() for k in m}
                            & {k for m in theirs.values() for k in m})
            metrics = {
                metric: paired_difference(
                    {s: m[metric] for s, m in mine.items() if metric in m},
                    {s: m[metric] for s, m in theirs.items() if metric in m})
                for metric in shared
            }
            table.append({"label": grid.label(point), "point": point, "setting": name,
                          "reference_setting": ref_name, "metrics": metrics})
        label = grid.label({VARIANT_KEY: ref}) if len(grid.values) == 1 else f"`{ref}`"
        comparisons.append({"reference": ref, "label": label, "metric": COMPARE_METRIC,
                            "rows": table})
    return comparisons


def build_results(spec: SweepSpec, out: str | Path) -> dict[str, Any]:
    """Per grid, its rows (label, setting, aggregated metrics) from the finished runs in ``out``.

    Grids that vary ``model.net.variant`` also get ``comparisons``: every variant's paired
    differences against each of the grid's ``compare_to`` variants (:func:`paired_comparisons`).
    """
    runs, rows = plan_runs(spec)
    collected = collect(spec, out)
    grids = []
    for grid in spec.grids:
        table = []
        for point, name in rows[grid.name]:
            per_seed = collected.get(name, {})
            table.append({"label": grid.label(point), "point": point, "setting": name,
                          "metrics": aggregate(per_seed)})
        grids.append({"name": grid.name, "title": grid.title, "keys": list(grid.values),
                      "rows": table, "compare_to": list(grid.compare_to),
                      "comparisons": paired_comparisons(grid, rows[grid.name], collected)})
    return {"title": spec.title, "description": spec.description, "seeds": spec.seeds,
            "runs_planned": len(runs),
            "runs_finished": sum(len(v) for v in collected.values()), "grids": grids}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _cell(stats: dict[str, Any] | None, n_seeds: int, bold: bool = False) -> str:
    if not stats or stats["n"] == 0:
        return ""
    text = f"{100 * stats['mean']:.1f}"
    if stats["n"] > 1:
        text += f" ± {100 * stats['std']:.1f}"
    if bold:
        text = f"**{text}**"
    if stats["n"] < n_seeds:
        text += f" (n={stats['n']})"
    return text


def format_table(grid: dict[str, Any], n_seeds: int, monitor: str = TEST_COMBINED_TOP1) -> str:
    """One grid as a markdown table: a row per setting, test top-1 per head, val combined.

    The val column is left out when no run has validation metrics (runs trained on the whole
    training split and tested at their final epoch).
    """
    names = {k for row in grid["rows"] for k in row["metrics"]}
    heads = head_names(names) or [COMBINED]
    has_val = MONITOR in names
    best = max((row["metrics"][monitor]["mean"] for row in grid["rows"]
                if monitor in row["metrics"]), default=None)
    key = short_key(grid["keys"][0]) if len(grid["keys"]) == 1 else "setting"
    header = [key, *[f"{h} (test)" for h in heads], *(["combined (val)"] if has_val else []),
              "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in grid["rows"]:
        m = row["metrics"]
        cells = [row["label"]]
        for head in heads:
            name = metric_name("test", head)
            is_best = name == monitor and best is not None and name in m and m[name]["mean"] == best
            cells.append(_cell(m.get(name), n_seeds, bold=is_best))
        if has_val:
            cells.append(_cell(m.get(MONITOR), n_seeds))
        cells.append(str(max((s["n"] for s in m.values()), default=0)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The whole report: a heading, a table per grid and the plots' links."""
    n_seeds = len(results["seeds"])
    seeds = ", ".join(map(str, results["seeds"]))
    parts = [f"# {results['title']}", ""]
    if results["description"]:
        parts += [results["description"], ""]
    has_val = any(MONITOR in row["metrics"]
                  for grid in results["grids"] for row in grid["rows"])
    checkpoint = (
        "of the checkpoint with the best validation combined top-1; the val column is that "
        "epoch's validation combined top-1." if has_val else
        "of each run's final epoch (trained on the whole training split, no validation split)."
    )
    parts += [
        f"Top-1 accuracy in %, mean ± sample standard deviation over {n_seeds} seeds "
        f"({seeds}); {results['runs_finished']} of {results['runs_planned']} runs finished. "
        "Test columns: each head and the combined prediction (the heads' softmaxes, averaged "
        "or weighed by the run's fitted weights) "
        f"{checkpoint} Bold: the best test combined mean of the table.",
        "",
    ]
    for grid in results["grids"]:
        parts += [f"## {grid['title']}", "", format_table(grid, n_seeds), ""]
        if plots and grid["name"] in plots:
            parts += [f"![{grid['title']}]({plots[grid['name']]})", ""]
        for i, comparison in enumerate(grid.get("comparisons", [])):
            parts += [f"### {grid['title']}: vs {comparison['label']}", ""]
            if i == 0:
                parts += [
                    "Paired by seed (the same seed gives the same data order and, where the "
                    "shapes allow, the same initial weights): for every seed finished by both "
                    "settings, the setting's test combined top-1 minus the reference's, in "
                    "percentage points. Mean and 95% confidence interval over those differences "
                    "(Student t, n - 1 degrees of freedom); n/a with a single pair.",
                    "",
                ]
            key = "variant" if len(grid["keys"]) == 1 else "setting"
            parts += [format_comparison(comparison, key), ""]
    return "\n".join(parts).rstrip() + "\n"


def format_comparison(comparison: dict[str, Any], key: str = "variant") -> str:
    """One reference's paired differences as a markdown table (percentage points).

    Args:
        comparison: An entry of a grid's ``comparisons`` (see :func:`paired_comparisons`).
        key: Heading of the first column.
    """
    metric = comparison["metric"]
    header = [key, "Δ test combined top-1", "95% CI", "pairs", "per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison["rows"]:
        stats = row["metrics"].get(metric)
        if not stats or not stats["n"]:
            cells = ["", "", "0", ""]
        else:
            ci = ("n/a" if stats["ci_low"] is None
                  else f"[{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}]")
            per_seed = ", ".join(f"{s}: {100 * d:+.1f}"
                                 for s, d in zip(stats["seeds"], stats["differences"], strict=True))
            cells = [f"{100 * stats['mean']:+.1f}", ci, str(stats["n"]), per_seed]
        lines.append("| " + " | ".join([row["label"], *cells]) + " |")
    return "\n".join(lines)


def write_plots(results: dict[str, Any], folder: str | Path) -> dict[str, str]:
    """A PNG per grid: accuracy against a numeric value (lines) or per setting (bars).

    Error bars are the sample std over seeds; dots are the single seeds.

    Returns:
        Grid name -> path of its plot relative to ``folder``'s parent (for markdown links).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for grid in results["grids"]:
        rows = [r for r in grid["rows"] if TEST_COMBINED_TOP1 in r["metrics"]]
        if not rows:
            continue
        names = {k for r in rows for k in r["metrics"]}
        heads = head_names(names)
        fig = Figure(figsize=(6.4, 4.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        numeric = len(grid["keys"]) == 1 and all(
            isinstance(r["point"][grid["keys"][0]], int | float)
            and not isinstance(r["point"][grid["keys"][0]], bool) for r in rows)
        if numeric:
            xs = [float(r["point"][grid["keys"][0]]) for r in rows]
            ax.set_xlabel(grid["keys"][0])
            ax.set_xticks(xs)
            gaps = [b - a for a, b in zip(sorted(xs), sorted(xs)[1:], strict=False)]
            dodge = 0.05 * min(gaps, default=1.0)
        else:
            xs = [float(i) for i in range(len(rows))]
            ax.set_xticks(xs, [r["label"].split(" (`")[0] for r in rows], rotation=15, ha="right")
            dodge = 0.1
        for i, head in enumerate(heads):
            name = metric_name("test", head)
            # Heads side by side around each x, so their error bars do not hide each other.
            shift = (i - (len(heads) - 1) / 2) * dodge
            pts = [(x + shift, r["metrics"][name]) for x, r in zip(xs, rows, strict=True)
                   if name in r["metrics"]]
            if not pts:
                continue
            combined = head == COMBINED
            ys = [100 * s["mean"] for _, s in pts]
            es = [100 * s["std"] for _, s in pts]
            style = ({"lw": 2.2, "color": "black", "zorder": 3} if combined
                     else {"lw": 1, "alpha": 0.8})
            ax.errorbar([x for x, _ in pts], ys, yerr=es, capsize=3, marker="o", ms=4,
                        label=head, ls="-" if numeric else "none", **style)
            if combined:
                for x, s in pts:
                    ax.scatter([x] * len(s["values"]), [100 * v for v in s["values"]], s=10,
                               color="black", alpha=0.35, zorder=2)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(grid["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncols=2)
        fig.tight_layout()
        path = folder / f"{grid['name']}.png"
        # No software/date metadata, so re-running the report gives the same bytes; written
        # under a temporary name and renamed into place.
        with replacing(path) as tmp:
            fig.savefig(tmp, metadata={"Software": None})
        written[grid["name"]] = f"{folder.name}/{path.name}"
    return written


def report_files(spec: SweepSpec, report: str | Path) -> list[Path]:
    """The files :func:`write_report` writes into ``report`` for ``spec``'s grids."""
    report = Path(report)
    return [report / "results.md", report / "results.json",
            *(report / "plots" / f"{grid.name}.png" for grid in spec.grids)]


def spec_inputs(spec: SweepSpec) -> list[Path]:
    """The files a sweep reads: the sweep file and its base config."""
    inputs = [spec.source] if spec.source is not None else []
    if isinstance(spec.base, str):
        inputs.append(Path(spec.base))
    return inputs


def check_report_files(spec: SweepSpec, report: str | Path, flag: str = "--report") -> None:
    """Refuse, before anything is run or written, a report that would replace the sweep file,
    its base config, or any checkpoint (a copy or a link) lying where a result file goes.

    Raises:
        UsageError: See :func:`crasmra.files.check_output`.
    """
    for path in report_files(spec, report):
        check_output(path, flag, inputs=spec_inputs(spec))


def write_report(spec: SweepSpec, out: str | Path, report: str | Path | None = None,
                 groups: Iterable[str] | None = None) -> dict[str, Any]:
    """Collect ``out``'s finished runs and write ``results.md``, ``results.json`` and plots.

    Each file is written under a temporary name and renamed into place; none replaces an
    input of the sweep or a checkpoint (see :func:`check_report_files`).

    Returns:
        The results mapping written to ``results.json``.
    """
    spec = select_grids(spec, groups)
    report = Path(report) if report is not None else Path(out)
    check_report_files(spec, report)
    report.mkdir(parents=True, exist_ok=True)
    results = build_results(spec, out)
    plots = write_plots(results, report / "plots")
    write_text(report / "results.md", format_markdown(results, plots))
    write_json(report / "results.json", results)
    return results
