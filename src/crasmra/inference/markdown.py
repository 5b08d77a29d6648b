"""``report.md`` and ``report.json``: a report written for people and for programs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from crasmra.errors import printable
from crasmra.files import write_text

__all__ = ["write_report"]


def _pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}%"


#: Characters Markdown gives a meaning to, escaped with a backslash in report.md (CommonMark
#: lets any ASCII punctuation be escaped): a class name must not become a link, an image, a
#: table column, emphasis or raw HTML such as <script>.
_MD_SPECIAL = set("\\`*_{}[]()#+!|<>~")


def _md_cell(text: object) -> str:
    """``text`` as literal Markdown: control characters escaped as ``predict`` prints them
    (ESC, BEL, CR, newline), Markdown punctuation backslash-escaped and ``&`` as ``&amp;``."""
    return "".join("&amp;" if ch == "&" else f"\\{ch}" if ch in _MD_SPECIAL else ch
                   for ch in printable(text))


def write_report(
    report: dict[str, Any],
    out_dir: str | Path,
    *,
    context: dict[str, Any] | None = None,
    figures: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` (for people) and ``report.json`` (for programs) into ``out_dir``.

    Args:
        report: From :func:`compute_report`.
        out_dir: Output folder (created).
        context: Shown at the top and stored under ``"context"`` (checkpoint, dataset, split).
        figures: ``{title: file name in out_dir}`` of PNGs to embed in ``report.md``.

    Returns:
        The paths of ``report.md`` and ``report.json``, each written atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = dict(context or {})
    figures = dict(figures or {})
    json_path = out / "report.json"
    write_text(json_path, json.dumps({"context": context, **report,
                                      "figures": figures}, indent=2) + "\n")

    lines = ["# crasmra evaluation report", ""]
    lines += [f"- {k}: {_md_cell(v)}" for k, v in context.items() if v is not None]
    lines += [f"- images evaluated: {report['num_images']} ({report['num_skipped']} unreadable, "
              "skipped)", f"- classes: {report['num_classes']}", ""]
    lines += ["## Accuracy by head", "",
              "The combined prediction is the mean of the heads' softmaxes (the paper's "
              "test-time rule; for the plain variant, its one classifier's softmax).", "",
              "| head | top-1 | top-5 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {_pct(v['top1'])} | {_pct(v['top5'])} |"
              for name, v in report["heads"].items()]
    cal = report["calibration"]
    lines += ["", "## Calibration (combined)", "",
              f"Expected calibration error: **{100 * cal['ece']:.2f}%** ({cal['n_bins']} "
              "equal-width confidence bins).", ""]
    lines += ["## Most confused pairs (combined)", ""]
    if report["confused_pairs"]:
        lines += ["| true class | predicted as | images | share of the true class |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| {_md_cell(p['true'])} | {_md_cell(p['predicted'])} | {p['count']} | "
                  f"{_pct(p['rate'])} |" for p in report["confused_pairs"]]
    else:
        lines.append("No image was misclassified.")
    lines += ["", "## Per-class accuracy (combined)", "",
              "| # | class | images | correct | accuracy |", "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {c['index']} | {_md_cell(c['label'])} | {c['support']} | {c['correct']} | "
              f"{_pct(c['accuracy'])} |" for c in report["per_class"]]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({name})" for title, name in figures.items()]
    if report["skipped"]:
        lines += ["", "## Unreadable images (skipped)", ""]
        lines += [f"- {_md_cell(s)}" for s in report["skipped"]]
    md_path = out / "report.md"
    write_text(md_path, "\n".join(lines) + "\n")
    return md_path, json_path
