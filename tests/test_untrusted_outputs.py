"""Nothing writes on an input, through a link or otherwise (issue 24, item 6)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, run_cli, tiny_fit_args
from untrusted_helpers import one_line_error


# ---------------------------------------------------------------------------------------------
# 6. nothing writes on an input, through a link or otherwise
# ---------------------------------------------------------------------------------------------
def _sweep_file(path: Path, base: Path = TINY_CONFIG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# my sweep: comments must survive\nbase: {base}\nseeds: [0]\n"
                    "defaults:\n  trainer.max_epochs: 1\n"
                    "grids:\n  g:\n    values:\n      model.net.delta: [0.5]\n")
    return path


@pytest.mark.timeout(240)
def test_sweep_leaves_its_own_sweep_file_alone(tmp_path: Path) -> None:
    sweep = _sweep_file(tmp_path / "d" / "sweep.yaml")
    before = sweep.read_text()
    assert run_cli(["sweep", "--config", str(sweep), "--out", str(sweep.parent)]) == 0
    assert sweep.read_text() == before
    assert (sweep.parent / "results.md").is_file()


@pytest.mark.parametrize("how", ["copy", "link"])
def test_sweep_never_writes_over_a_checkpoint(
    how: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = _sweep_file(tmp_path / "sweep.yaml")
    victim = tmp_path / "victim.ckpt"
    shutil.copyfile(tiny_checkpoint, victim)
    data = victim.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    if how == "copy":
        shutil.copyfile(victim, out / "sweep.yaml")
    else:
        (out / "sweep.yaml").symlink_to(victim)
    assert run_cli(["sweep", "--config", str(sweep), "--out", str(out)]) == 2
    assert "holds a checkpoint" in one_line_error(capsys)
    assert not (out / "runs").exists()  # refused before any run
    # The results of a report: results.md a link to a checkpoint.
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.md").symlink_to(victim)
    assert run_cli(["sweep", "--config", str(sweep), "--out", str(tmp_path / "o2"),
                    "--report", str(report), "--report-only"]) == 2
    assert "holds a checkpoint" in one_line_error(capsys)
    assert victim.read_bytes() == data


def test_fit_refuses_to_replace_its_input_config(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    shutil.copyfile(TINY_CONFIG, config)
    before = config.read_text()
    code = run_cli(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 2
    assert "also an input" in one_line_error(capsys)
    assert config.read_text() == before
    assert not (tmp_path / "checkpoints").exists()


def test_fit_never_writes_class_names_through_a_link(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.ckpt"
    shutil.copyfile(tiny_checkpoint, victim)
    data = victim.read_bytes()
    root = tmp_path / "run"
    root.mkdir()
    (root / "classes.txt").symlink_to(victim)
    assert run_cli(tiny_fit_args(root)) == 2
    assert "holds a checkpoint" in one_line_error(capsys)
    assert victim.read_bytes() == data
