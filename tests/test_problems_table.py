"""benchmarks/problems_table.py: several validation problems' runs, paired by problem."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import problems_table  # noqa: E402


def _run(root: Path, setting: str, problem: int, top1: float | None) -> None:
    folder = root / setting / f"problem-{problem}"
    folder.mkdir(parents=True)
    test = {} if top1 is None else {problems_table.METRIC: top1}
    (folder / "metrics.json").write_text(json.dumps({"test": test}))


def _anchors(root: Path, problem: int, ncm: float, probe: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"anchors-problem-{problem}.json").write_text(json.dumps(
        {"accuracy": {"prelogits": {"ncm": ncm, "linear_probe": probe}}}))


def test_settings_are_paired_by_problem_and_counted_against_the_ncm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, anchors = tmp_path / "runs", tmp_path / "anchors"
    _run(runs, "baseline", 0, 0.80)
    _run(runs, "baseline", 1, 0.90)
    _run(runs, "baseline", 2, 0.70)
    _run(runs, "cra-smra", 0, 0.78)
    _run(runs, "cra-smra", 1, 0.86)
    _run(runs, "cra-smra", 2, None)  # stopped before its test: no value, no pair
    for problem, ncm in enumerate([0.79, 0.88, 0.75]):
        _anchors(anchors, problem, ncm, ncm + 0.01)

    assert problems_table.main(["--runs", str(runs), "--anchors", str(anchors),
                                "--compare-to", "NCM", "baseline"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| baseline | 3 | 80.0 ± 10.0 | 70.0 | 1 |" in out
    assert "| cra-smra | 2 | 82.0 ± 5.7 | 78.0 | 2 |" in out
    assert "| NCM | 3 | 80.7 ± 6.7 | 75.0 |  |" in out
    # cra-smra - baseline over problems 0 and 1 only: -2 and -4 points.
    row = next(line for line in out if line.startswith("| cra-smra | baseline |"))
    assert row.startswith("| cra-smra | baseline | 2 | -3.0 | [-15.7, +9.7] |")
    assert "| baseline | NCM | 3 | -0.7 | " in "\n".join(out)


def test_without_anchors_the_count_under_the_ncm_is_blank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, "baseline", 0, 0.80)
    assert problems_table.main(["--runs", str(tmp_path), "--compare-to"]) == 0
    assert "| baseline | 1 | 80.0 ± 0.0 | 80.0 |  |" in capsys.readouterr().out.splitlines()


def test_no_finished_run_is_an_error_that_names_the_layout(tmp_path: Path) -> None:
    _run(tmp_path, "baseline", 0, None)
    with pytest.raises(SystemExit):
        problems_table.main(["--runs", str(tmp_path)])
