"""The training module's flat options moved into typed parts: old flags, config keys and sweep
keys are refused with their new place, and checkpoints and sweeps written before the move
still work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, run_cli, tiny_fit_args
from crasmra.flag_moves import (
    MOVED_KEYS,
    flat_model_section,
    legacy_key,
    moved_message,
    nest_flat_hparams,
)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("old", "new"), [
    ("--model.omega=0.3", "--model.omega is now --model.net.omega"),
    ("--model.lr_heads=0.1", "--model.lr_heads is now --model.optim.lr_heads"),
    ("--model.alpha=1", "--model.alpha is now --model.loss.alpha"),
    ("--model.head_init=imprint", "--model.head_init is now --model.finetune.head_init"),
    ("--model.nonfinite_loss=skip", "--model.nonfinite_loss is now --model.runtime.nonfinite_loss"),
    ("--model.variant", "--model.variant is now --model.net.variant"),
])
def test_an_old_flag_names_its_new_place_in_one_line(
    old: str, new: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tiny_fit_args(tmp_path, old, *([] if "=" in old else ["plain"]))
    assert run_cli(args) == 2
    assert _one_error_line(capsys) == f"crasmra: error: {new}"
    assert not (tmp_path / "checkpoints").exists()


def test_an_old_key_in_a_config_file_names_its_new_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  backbone: resnet10t\n  lr_heads: 0.1\n")
    assert run_cli(["fit", f"--config={TINY_CONFIG}", f"--config={old}",
                    f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("crasmra: error: model.backbone is now model.net.backbone in ")
    # A recipe over a base (__base__) is merged first: its old keys are found all the same.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"__base__: {TINY_CONFIG}\nmodel:\n  omega: 0.3\n")
    assert run_cli(["fit", f"--config={recipe}",
                    f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 2
    assert "model.omega is now model.net.omega" in _one_error_line(capsys)


def test_an_old_key_in_a_sweep_file_names_its_new_place(tmp_path: Path) -> None:
    from crasmra.sweep import SweepError, parse_sweep

    data = {"base": {"model": {"net": {"backbone": "resnet10t"}}}, "seeds": [0],
            "grids": {"d": {"values": {"model.delta": [0.5, 0.9]}}}}
    with pytest.raises(SweepError, match=r"model\.delta is now model\.net\.delta\.$"):
        parse_sweep(data)


def test_every_old_name_has_one_new_place() -> None:
    for name, part in MOVED_KEYS.items():
        assert moved_message(f"model.{name}") == f"--model.{name} is now --model.{part}.{name}"
        assert legacy_key(f"model.{part}.{name}") == f"model.{name}"
    assert moved_message("model.net") is None and moved_message("data.root") is None
    assert legacy_key("data.train_per_class") == "data.train_per_class"


def test_sweep_runs_keep_their_identity_across_the_move() -> None:
    """Folder names, setting keys and base fingerprints are those of the flat layout."""
    from crasmra.sweep.plan import setting_key, setting_name
    from crasmra.sweep.run import base_fingerprint

    old = {"data.train_per_class": 1, "model.variant": "plain", "model.gamma": 1.0}
    new = {"data.train_per_class": 1, "model.net.variant": "plain", "model.loss.gamma": 1.0}
    assert setting_key(new) == setting_key(old)
    assert setting_name(new, ["data.train_per_class", "model.net.variant"]) == (
        "train_per_class=1_variant=plain")
    flat = {"model": {"backbone": "resnet10t", "lr_heads": 0.1, "classes": None},
            "data": {"batch_size": 4}}
    nested = {"model": {"net": {"backbone": "resnet10t"}, "optim": {"lr_heads": 0.1},
                        "classes": None}, "data": {"batch_size": 4}}
    assert flat_model_section(nested) == flat
    assert base_fingerprint(nested) == base_fingerprint(flat)


# ---------------------------------------------------------------------------------------------
# checkpoints written before the move: flat hyperparameters, format 1
# ---------------------------------------------------------------------------------------------
def flatten_checkpoint(path: Path) -> None:
    """Rewrite a checkpoint as crasmra wrote it before the parts: flat ``hyper_parameters``
    (one key per former ``--model.*`` flag, plus LightningCLI's ``_instantiator``), format 1,
    and the backbone's data config with tuples."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    flat: dict[str, Any] = {"_instantiator": "lightning.pytorch.cli.instantiate_module"}
    for key, value in hparams.items():
        # Options added after the move never stood in a flat checkpoint.
        flat.update({k: v for k, v in value.items() if k in MOVED_KEYS}
                    if key in ("net", "loss", "optim", "finetune", "runtime") else {key: value})
    assert set(flat) - {"_instantiator", "classes", "transform_config"} >= set(MOVED_KEYS)
    ckpt["hyper_parameters"] = flat
    meta = ckpt["crasmra"]
    meta["format_version"] = 1
    meta["data_config"] = {k: tuple(v) if isinstance(v, list) else v
                           for k, v in meta["data_config"].items()}
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def flat_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run folder with both checkpoints in the flat layout."""
    root = tmp_path_factory.mktemp("flat-run")
    shutil.copytree(tiny_run / "checkpoints", root / "checkpoints")
    for name in ("best.ckpt", "last.ckpt"):
        flatten_checkpoint(root / "checkpoints" / name)
    return root


def test_nesting_flat_hyperparameters_gives_the_parts(flat_run: Path) -> None:
    from crasmra.engine import CRASMRAModule

    flat = torch.load(flat_run / "checkpoints" / "best.ckpt", weights_only=True)[
        "hyper_parameters"]
    nested = nest_flat_hparams(flat)
    assert nested["net"]["backbone"] == "resnet10t" and nested["optim"]["lr_heads"] == 0.02
    module = CRASMRAModule.from_hparams(flat)
    assert module.optim.lr_heads == 0.02 and module.net.num_classes == 4


def test_a_flat_checkpoint_predicts_evaluates_reports_and_exports(
    flat_run: Path, tmp_path: Path
) -> None:
    from crasmra.inference import load_model

    best = flat_run / "checkpoints" / "best.ckpt"
    model = load_model(best)
    assert model.num_classes == 4 and model.variant == "cra-smra"
    image = tmp_path / "bird.png"
    Image.new("RGB", (80, 60), (120, 90, 30)).save(image)
    assert run_cli(["predict", str(best), str(image), "--format", "json", "--quiet"]) == 0
    assert run_cli(["report", str(best), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    out = tmp_path / "model.safetensors"
    assert run_cli(["export", str(best), "--format", "safetensors", "--out", str(out)]) == 0
    assert out.is_file()
    assert run_cli(["test", f"--ckpt_path={best}",
                    f"--trainer.default_root_dir={tmp_path / 'eval'}"]) == 0


def test_a_flat_checkpoint_resumes_with_ckpt_path(flat_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "resumed"
    shutil.copytree(flat_run, root)
    args = tiny_fit_args(root, "--trainer.max_epochs=3", "--ckpt_path=last",
                         "--test_after_fit=false")
    assert run_cli(args) == 0
    # The copied folder is not the one the checkpoint callback saved into: it versions its
    # files (last-v1.ckpt) instead of replacing them.
    saved = [torch.load(p, weights_only=True) for p in (root / "checkpoints").glob("last*.ckpt")]
    ckpt = max(saved, key=lambda c: c["global_step"])
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 9
    # Written again in the parts layout.
    assert ckpt["crasmra"]["format_version"] == 2
    assert ckpt["hyper_parameters"]["optim"]["lr_heads"] == 0.02
