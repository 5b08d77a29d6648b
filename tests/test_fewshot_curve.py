"""benchmarks/fewshot_curve.py: the few-shot table and plot from a sweep report and anchors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import fewshot_curve  # noqa: E402


def _row(variant: str, shots: int, values: list[float] | None) -> dict:
    metrics = {} if values is None else {fewshot_curve.METRIC: {"values": values}}
    return {"point": {"model.net.variant": variant, "data.train_per_class": shots},
            "metrics": metrics}


def _anchors(ncm: float, probe: float) -> dict:
    return {"accuracy": {"prelogits": {"ncm": ncm, "linear_probe": probe}}}


def test_the_table_averages_the_seeds_and_sits_beside_the_anchors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {"grids": [{"rows": [
        _row("plain", 1, [0.40, 0.50]),
        _row("plain", 2, [0.60]),
        _row("baseline", 1, [0.30]),
        _row("baseline", 2, None),  # not finished: no cell
    ]}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "anchors-k1.json").write_text(json.dumps(_anchors(0.41, 0.52)))
    (tmp_path / "anchors-k2.json").write_text(json.dumps(_anchors(0.61, 0.66)))
    (tmp_path / "full.json").write_text(json.dumps(_anchors(0.86, 0.90)))
    plot = tmp_path / "plots" / "curve.png"
    assert fewshot_curve.main([
        "--results", str(tmp_path / "results.json"), "--anchors", str(tmp_path),
        "--full-anchors", str(tmp_path / "full.json"), "--full-shots", "30",
        "--plot", str(plot),
    ]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| photos per class | `plain` | `baseline` | NCM | linear probe |"
    assert "| 1 | 45.0 ± 7.1 (n=2) | 30.0 | 41.0 | 52.0 |" in lines
    assert "| 2 | 60.0 |  | 61.0 | 66.0 |" in lines
    assert "| 30 |  |  | 86.0 | 90.0 |" in lines
    # Minus the nearest class mean: the mean over seeds and, with several, the lowest seed.
    assert "| 1 | +4.0 (lowest -1.0) | -11.0 |" in lines
    assert "| 2 | -1.0 |  |" in lines
    assert plot.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_a_later_report_replaces_the_runs_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = {"grids": [{"rows": [_row("plain", 1, [0.40]), _row("cra-smra", 1, [0.30, 0.20]),
                                 _row("cra-smra", 2, [0.60])]}]}
    second = {"grids": [{"rows": [_row("cra-smra", 1, [0.45, 0.47])]}]}
    (tmp_path / "first.json").write_text(json.dumps(first))
    (tmp_path / "second.json").write_text(json.dumps(second))
    for k in (1, 2):
        (tmp_path / f"anchors-k{k}.json").write_text(json.dumps(_anchors(0.5, 0.6)))
    assert fewshot_curve.main(["--results", str(tmp_path / "first.json"),
                               "--results", str(tmp_path / "second.json"),
                               "--anchors", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| photos per class | `plain` | `cra-smra` | NCM | linear probe |"
    assert "| 1 | 40.0 | 46.0 ± 1.4 (n=2) | 50.0 | 60.0 |" in lines
    assert "| 2 |  | 60.0 | 50.0 | 60.0 |" in lines
