"""What a new user meets on the command line: flags, hints, help, evaluation folders, output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY_CONFIG, run_cli, tiny_fit_args
from crasmra.cli import main


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


# ---------------------------------------------------------------------------------------------
# flags: no abbreviations, one line and the closest names for an unknown one
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["fit", "--trainer.max_epoch", "3"], "--trainer.max_epochs"),
        (["fit", "--model.net.delt", "0.5"], "--model.net.delta"),
        (["fit", "--model.net.detla", "0.8"], "--model.net.delta"),
        (["fit", "--max_epochs", "3"], "--trainer.max_epochs"),
        (["predict", "--topk", "3", "model.ckpt", "bird.jpg"], "--top-k"),
        (["demo", "--epoch", "3"], "--epochs"),
        (["pridict"], "predict"),
    ],
)
def test_an_unknown_or_abbreviated_flag_is_one_line_with_the_closest_names(
    args: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # One error line and a pointer to --help, not the command's full usage.
    assert len(err.strip().splitlines()) == 2, err
    line = err.splitlines()[0]
    assert "error:" in line and f"did you mean {suggestion}" in line
    assert "--help" in err.splitlines()[1]


def test_an_abbreviation_never_sets_a_flag(tmp_path: Path) -> None:
    # `--trainer.max_epoch 3` used to train for 3 epochs; now nothing runs.
    with pytest.raises(SystemExit):
        main(tiny_fit_args(tmp_path, "--trainer.max_epoch=3"))
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# help and version without torch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--version"], ["--help"], ["predict", "--help"]])
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from crasmra.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:]


def test_the_package_imports_its_public_names_on_first_use() -> None:
    import crasmra

    assert crasmra.__version__
    assert crasmra.CRAM.__name__ == "CRAM" and callable(crasmra.load_model)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        crasmra.nothing  # noqa: B018


# ---------------------------------------------------------------------------------------------
# evaluation never blocks training nor destroys earlier results
# ---------------------------------------------------------------------------------------------
def _tiny_trained(root: Path) -> Path:
    assert run_cli(tiny_fit_args(root, "--test_after_fit=false")) == 0
    return root / "checkpoints" / "best.ckpt"


def test_test_and_validate_keep_out_of_the_training_record(tmp_path: Path) -> None:
    ckpt = _tiny_trained(tmp_path / "trained")
    evaluated = tmp_path / "evaluated"
    for command in ("validate", "test"):
        assert run_cli([command, f"--config={TINY_CONFIG}", f"--ckpt_path={ckpt}",
                        f"--trainer.default_root_dir={evaluated}"]) == 0
        assert (evaluated / command / "metrics.json").is_file()
        assert (evaluated / command / "metrics.csv").is_file()
    assert not (evaluated / "metrics.json").exists()
    # A fit into the folder that only holds evaluations starts without --overwrite.
    assert run_cli(tiny_fit_args(evaluated, "--test_after_fit=false")) == 0


def test_evaluation_without_data_options_uses_the_checkpoints_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _tiny_trained(tmp_path / "trained")  # 4 classes; the parser's default data has 10
    out = tmp_path / "eval"
    assert run_cli(["test", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={out}",
                    "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]) == 0
    assert "data the checkpoint was trained with" in capsys.readouterr().err
    assert json.loads((out / "test" / "metrics.json").read_text())["test"]


def test_a_failed_evaluation_keeps_the_earlier_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _tiny_trained(tmp_path / "trained")
    out = tmp_path / "eval"
    base = [f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={out}"]
    assert run_cli(["test", f"--config={TINY_CONFIG}", *base]) == 0
    before = (out / "test" / "metrics.csv").read_text()
    capsys.readouterr()
    # Data of another class count: refused, with advice for evaluating (not fine-tuning).
    assert run_cli(["test", f"--config={TINY_CONFIG}", "--data.options={num_classes: 3}",
                    *base]) == 2
    err = capsys.readouterr().err
    assert "Evaluate it on the data it was trained on" in err and "init_from" not in err
    assert (out / "test" / "metrics.csv").read_text() == before


# ---------------------------------------------------------------------------------------------
# what the demo and the evaluations print
# ---------------------------------------------------------------------------------------------
def test_the_demo_prints_each_thing_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import crasmra.demo

    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trainer"].pop("enable_model_summary")  # the demo's own default applies
    monkeypatch.setattr(crasmra.demo, "DEMO_CONFIG", config)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "FLOPs" not in printed and "Loading `train_dataloader`" not in printed
    assert "Test metric" not in printed  # Lightning's table; the demo prints its own
    assert [line.split()[:1] for line in printed.splitlines()].count(["combined"]) == 1
    assert "Model: resnet10t cra-smra" in printed and "M parameters" in printed
    assert "exists and is not empty" not in printed


def test_evaluating_a_checkpoint_from_another_folder_is_quiet(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["validate", f"--config={TINY_CONFIG}", f"--ckpt_path={tiny_checkpoint}",
                    f"--trainer.default_root_dir={tmp_path}"]) == 0
    assert "dirpath has changed" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _capture_figure(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import crasmra.viz.plots

    captured: dict[str, Any] = {}

    def keep(fig: Any, path: str | Path) -> Path:
        captured["figure"] = fig
        return Path(path)

    monkeypatch.setattr(crasmra.viz.plots, "_save", keep)
    return captured


def test_confusion_matrix_shows_whole_class_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crasmra.viz import plot_confusion_matrix

    classes = ["head-plain wing-plain tail-plain", "head-plain wing-plain tail-striped",
               "head-spotted wing-striped tail-plain"]
    captured = _capture_figure(monkeypatch)
    plot_confusion_matrix(np.eye(3, dtype=int), classes, tmp_path / "cm.png")
    ax = captured["figure"].axes[0]
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [" ".join(t.get_text().split()) for t in ticks] == classes


def test_reliability_diagram_draws_only_what_its_legend_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crasmra.viz import plot_reliability

    # Under-confident bins (accuracy above confidence) used to get a translucent bar drawn
    # over the accuracy bar: a dark overlay that the legend did not explain.
    bins = [
        {"lower": i / 4, "upper": (i + 1) / 4, "accuracy": min(1.0, i / 4 + 0.2),
         "confidence": i / 4 + 0.1, "count": 5}
        for i in range(4)
    ]
    captured = _capture_figure(monkeypatch)
    plot_reliability({"bins": bins, "ece": 0.1}, tmp_path / "rel.png")
    top = captured["figure"].axes[0]
    assert all(p.get_alpha() in (None, 1.0) for p in top.patches)
    legend = {t.get_text() for t in top.get_legend().get_texts()}
    assert {"accuracy in the bin", "mean confidence in the bin"} <= legend


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------
def test_readme_names_what_the_browser_test_needs_and_where_fit_writes() -> None:
    readme = (REPO / "README.md").read_text()
    assert "chromium-driver" in readme
    assert "runs/crasmra" in readme


# ---------------------------------------------------------------------------------------------
# missing extras: one line with the install command for a registry install and for a clone
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("missing", "args", "extra"),
    [
        ("onnx", ["export", "{ckpt}", "--format", "onnx", "--out", "{tmp}/m.onnx"], "export"),
        ("fastapi", ["serve", "{ckpt}", "--port", "0"], "serve"),
    ],
)
def test_a_missing_extra_is_one_line_for_both_installs(
    missing: str, args: list[str], extra: str, tiny_checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)
    # A fresh import of crasmra.serve, as in a process without the extra; afterwards the
    # modules as they were, so that no half-imported copy stays behind for later tests.
    import crasmra

    def serve_modules() -> list[str]:
        return [m for m in sys.modules if m == "crasmra.serve" or m.startswith("crasmra.serve.")]

    saved = {name: sys.modules.pop(name) for name in serve_modules()}
    saved_attribute = crasmra.__dict__.pop("serve", None)
    try:
        argv = [a.format(ckpt=tiny_checkpoint, tmp=tmp_path) for a in args]
        assert main(argv) == 2
    finally:
        for name in serve_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        crasmra.__dict__.pop("serve", None)
        if saved_attribute is not None:
            crasmra.serve = saved_attribute
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert "Traceback" not in err and len(errors) == 1, err
    assert f'pip install "crasmra[{extra}]"' in errors[0]
    assert f'pip install -e ".[{extra}]"' in errors[0]


def test_own_warnings_are_one_log_line_without_a_source_line(capsys) -> None:
    import os
    import warnings

    from crasmra import cli
    from crasmra.data import base

    cli._configure_logging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base.warn_counts("cub", [("classes", 10, 200), ("training images", 148, 5994),
                                 ("test images", 145, 145)])
    assert len(caught) == 1  # the mismatching counts together, the matching one left out
    w = caught[0]
    message = str(w.message)
    assert "found 10 classes" in message and "found 148 training images" in message
    assert "test images" not in message
    # where a dataset warns
    inside = os.path.join(cli._PACKAGE_DIR, "data", "benchmarks", "common.py")
    cli._show_warning(w.message, w.category, inside, 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("WARNING crasmra") and "cub: found" in err
    # Warnings from elsewhere keep Python's format (file, line number and category).
    cli._show_warning(UserWarning("x"), UserWarning, os.path.abspath(__file__), 1)
    assert "UserWarning" in capsys.readouterr().err


def test_options_of_another_dataset_say_how_to_clear_them(tmp_path, capsys) -> None:
    """configs/demo.yaml's synthetic options with --data.dataset folder: one line that says
    --data.options '{}' clears them."""
    from conftest import REPO, run_cli

    root = tmp_path / "photos"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
    code = run_cli(["fit", f"--config={REPO / 'configs/demo.yaml'}", "--data.dataset=folder",
                    f"--data.root={root}", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "does not take option(s)" in err[-1] and "--data.options '{}'" in err[-1]
