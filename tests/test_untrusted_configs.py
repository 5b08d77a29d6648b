"""Configs and sweep files (issue 24, items 7 and 8): no value imports a module outside the
allow-list, wherever jsonargparse would import it; a YAML bomb is refused at once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, run_cli, tiny_fit_args
from untrusted_helpers import one_line_error, run


# ---------------------------------------------------------------------------------------------
# 7. configs and class paths
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on the import path that leaves a file behind when imported or called."""
    name = "evilmod_issue24"
    mark = tmp_path / "imported"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        "from pathlib import Path\n"
        "from lightning.pytorch.callbacks import Callback\n"
        f"Path({str(mark)!r}).write_text('imported')\n"
        "class Cb(Callback):\n    pass\n"
        "def hook(*args, **kwargs):\n"
        f"    Path({str(mark)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name, mark


def _class_path_attacks(name: str, tmp_path: Path) -> dict[str, list[str]]:
    listed = tmp_path / "listed.yaml"
    listed.write_text(f"trainer:\n  callbacks:\n  - {name}.Cb\n")
    hook = tmp_path / "lambda.yaml"
    hook.write_text("trainer:\n  callbacks:\n"
                    "  - class_path: lightning.pytorch.callbacks.LambdaCallback\n"
                    f"    init_args:\n      on_fit_start: {name}.hook\n")
    return {
        "callbacks list": [f'--trainer.callbacks=["{name}.Cb"]'],
        "plugins list": [f'--trainer.plugins=["{name}.Cb"]'],
        "nested trainer": [f"--trainer={{callbacks: [{{class_path: {name}.Cb}}]}}"],
        "help": ["--trainer.callbacks.help", f"{name}.Cb"],
        "config list": [f"--config={listed}"],
        "LambdaCallback hook": [f"--config={hook}", "--test_after_fit=false"],
    }


@pytest.mark.parametrize("attack", ["callbacks list", "plugins list", "nested trainer", "help",
                                    "config list", "LambdaCallback hook"])
def test_no_flag_or_config_imports_a_module_outside_the_allow_list(
    attack: str, evil_module: tuple[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, mark = evil_module
    args = _class_path_attacks(name, tmp_path)[attack]
    assert run(tiny_fit_args(tmp_path / "run", *args)) == 2
    assert "CRASMRA_CLASS_PACKAGES" in one_line_error(capsys)
    assert name not in sys.modules and not mark.exists()


def test_a_sweep_default_cannot_import_either(
    evil_module: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, mark = evil_module
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {TINY_CONFIG}\nseeds: [0]\ndefaults:\n"
                     f"  trainer.callbacks: [{name}.Cb]\n"
                     "grids:\n  g:\n    values:\n      model.net.delta: [0.5]\n")
    code = run_cli(["sweep", "--config", str(sweep), "--out", str(tmp_path / "o"),
                    "--dry-run"])
    assert code == 2
    assert "CRASMRA_CLASS_PACKAGES" in one_line_error(capsys)
    assert name not in sys.modules and not mark.exists()


def test_a_listed_package_may_be_imported(evil_module: tuple[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name, mark = evil_module
    monkeypatch.setenv("CRASMRA_CLASS_PACKAGES", name)
    # --print_config resolves (imports) the class and stops before any training.
    code = run(tiny_fit_args(tmp_path / "run", f"--trainer.callbacks+={name}.Cb",
                             "--print_config"))
    assert code == 0 and mark.read_text() == "imported"


def _bomb(indent: str = "") -> str:
    lines = [f'{indent}a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{indent}{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["sweep file", "fit --config", "flag value"])
def test_a_yaml_bomb_is_refused_at_once(where: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if where == "sweep file":
        path = tmp_path / "sweep.yaml"
        path.write_text(f"base: {TINY_CONFIG}\nseeds: [0]\ndefaults:\n  data.options:\n"
                        f"{_bomb('    ')}grids:\n  g:\n    values:\n      model.net.delta: [0.5]\n")
        args = ["sweep", "--config", str(path), "--out", str(tmp_path / "o"), "--dry-run"]
    elif where == "fit --config":
        path = tmp_path / "bomb.yaml"
        path.write_text("model:\n  attention_options:\n" + _bomb("    "))
        args = tiny_fit_args(tmp_path / "run", f"--config={path}")
    else:
        args = tiny_fit_args(tmp_path / "run",
                             "--model.net.attention_options={" + _bomb().replace("\n", ", ") + "}")
    start = time.monotonic()
    assert run_cli(args) == 2
    assert "YAML bomb" in one_line_error(capsys)
    assert time.monotonic() - start < 30


def test_yaml_aliases_of_modest_size_still_work() -> None:
    from crasmra.config import load_yaml

    assert load_yaml("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}
