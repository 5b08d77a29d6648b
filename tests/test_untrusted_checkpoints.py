"""A checkpoint is data from strangers (issue 24, items 1-5 and 9): whatever its metadata and
stored settings say, memory stays bounded, every value is checked as the same command-line
value would be, and every refusal is one line with exit status 2."""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import crasmra.engine as engine
from conftest import run_cli, tiny_fit_args
from crasmra.checkpoint import CheckpointError, load_checkpoint_file, save_safetensors
from crasmra.inference import load_model, run_dataset_config
from crasmra.model import CRASMRANet
from untrusted_helpers import TINY_OPTIONS, altered, one_line_error, png


@pytest.fixture(scope="module")
def full_ckpt(tiny_checkpoint: Path) -> dict[str, Any]:
    """The tiny training checkpoint as stored (hyperparameters and data settings included)."""
    return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# 1-5. a checkpoint is data from strangers
# ---------------------------------------------------------------------------------------------
def test_report_refuses_a_class_count_it_cannot_tabulate(
    full_ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A consistent checkpoint of 1,500 classes with narrow heads (a few MB): the report would
    # build a K x K matrix, draw it and write it as JSON; refused before any image is read.
    k = 1_500
    config = {**full_ckpt["crasmra"]["net_config"], "num_classes": k, "pretrained": False}
    net = CRASMRANet(**config)
    meta = {**full_ckpt["crasmra"], "net_config": {**config, "pretrained": False},
            "classes": [f"c{i}" for i in range(k)]}
    ckpt = tmp_path / "many.ckpt"
    torch.save({"state_dict": net.state_dict(), "crasmra": meta}, ckpt)
    for name in ("c0", "c1"):
        png(tmp_path / "data" / "test" / name / "a.png")
    out = tmp_path / "report"
    code = run_cli(["report", str(ckpt), "--data", "folder", "--root", str(tmp_path / "data"),
                    "--out", str(out), "--quiet"])
    assert code == 2
    assert "at most 1,000 classes" in one_line_error(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_report_memory_is_checked_before_evaluating() -> None:
    from crasmra.inference import MAX_REPORT_BYTES, check_report_size

    check_report_size(5_794, 200, 4)  # CUB's test split
    with pytest.raises(ValueError, match="GiB"):
        check_report_size(MAX_REPORT_BYTES // (1_000 * 5 * 4) + 1, 1_000, 4)


BAD_DATA_SETTINGS = {
    "test_samples_per_class 1e8": lambda d: d["options"].update(test_samples_per_class=1e8),
    "native_size 50000": lambda d: d["options"].update(native_size=50_000),
    "clutter 1e12": lambda d: d["options"].update(clutter=1e12),
    "max_rotation NaN": lambda d: d["options"].update(max_rotation=math.nan),
    "options 'abc'": lambda d: d.update(options="abc"),
    "image_size 50000": lambda d: d.update(image_size=50_000),
    "mean NaN": lambda d: d.update(mean=[math.nan, 0.5, 0.5]),
}


@pytest.mark.parametrize("attack", list(BAD_DATA_SETTINGS))
def test_stored_data_settings_are_checked_like_flags(
    attack: str, full_ckpt: dict[str, Any], tmp_path: Path
) -> None:
    ckpt = altered(full_ckpt, tmp_path,
                   lambda c: BAD_DATA_SETTINGS[attack](c["datamodule_hyper_parameters"]))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="data settings"):
        run_dataset_config(ckpt)  # what report and serve read
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("command", ["report", "test"])
def test_stored_data_settings_refused_in_one_line(
    command: str, full_ckpt: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = altered(full_ckpt, tmp_path,
                   lambda c: c["datamodule_hyper_parameters"]["options"].update(clutter=1e12))
    if command == "report":
        args = ["report", str(ckpt), "--out", str(tmp_path / "r"), "--quiet"]
    else:
        args = ["test", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    assert run_cli(args) == 2
    assert "clutter must be an integer in 0..1000" in one_line_error(capsys)


def test_evaluation_takes_only_data_settings_from_the_checkpoint(
    full_ckpt: dict[str, Any], tmp_path: Path
) -> None:
    from crasmra.checkpoint import check_data_settings

    stored = {**full_ckpt["datamodule_hyper_parameters"], "batch_size": 10**9,
              "num_workers": 10**6}
    checked = check_data_settings(stored, "x.ckpt")
    assert "batch_size" not in checked and "num_workers" not in checked
    assert checked["options"] == stored["options"]


def test_hyperparameters_are_compared_with_the_weights_before_building(
    full_ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lightning builds the module from the stored hyperparameters before it compares any
    # weight: a file declaring 2,048-wide heads for 5,000 classes would allocate first.
    def change(c: dict[str, Any]) -> None:
        c["hyper_parameters"].update(head_hidden=2_048, num_classes=5_000, classes=None)

    ckpt = altered(full_ckpt, tmp_path, change)
    devices: list[str] = []
    real = engine.CRASMRAModule.__init__

    @functools.wraps(real)  # the parser reads the constructor's signature through it
    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        devices.append(str(torch.get_default_device()))
        real(self, *args, **kwargs)

    monkeypatch.setattr(engine.CRASMRAModule, "__init__", spy)
    code = run_cli(["test", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 2
    assert "does not fit the network" in one_line_error(capsys)
    assert devices and set(devices) == {"meta"}


def test_a_smaller_mismatch_is_one_line_not_a_traceback(
    full_ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = altered(full_ckpt, tmp_path, lambda c: c["hyper_parameters"].update(head_hidden=16))
    code = run_cli(["test", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 2
    assert "does not fit the network" in one_line_error(capsys)


def test_options_that_do_not_fit_the_checkpoint_are_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Resuming with other network options: Lightning would build the network, then fail to
    # load the weights with a size-mismatch traceback.
    root = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", root / "checkpoints")
    code = run_cli(tiny_fit_args(root, "--model.net.head_hidden=16", "--ckpt_path=last"))
    assert code == 2
    assert "does not fit the network the options describe" in one_line_error(capsys)


BAD_NORMALIZATION = {
    "mean NaN": {"mean": [math.nan] * 3},
    "std with a NaN": {"std": [1.0, math.nan, 1.0]},
    "mean 1e308": {"mean": [1e308] * 3},
    "mean -1e308": {"mean": [-1e308] * 3},
    "std inf": {"std": [math.inf] * 3},
    "mean '123'": {"mean": "123"},
    "std 0": {"std": [0.0, 1.0, 1.0]},
}


@pytest.mark.parametrize("attack", list(BAD_NORMALIZATION))
def test_normalization_must_be_finite_and_sane(
    attack: str, full_ckpt: dict[str, Any], tmp_path: Path
) -> None:
    ckpt = altered(full_ckpt, tmp_path,
                   lambda c: c["crasmra"]["transform"].update(BAD_NORMALIZATION[attack]))
    with pytest.raises(CheckpointError, match=r"(mean|std) must be 3 finite numbers"):
        load_model(ckpt)
    # The same metadata in a safetensors export.
    export = tmp_path / "model.safetensors"
    state = {k[len("net."):]: v for k, v in full_ckpt["state_dict"].items() if k.startswith("net.")}
    crasmra_meta = json.loads(json.dumps(full_ckpt["crasmra"]))
    crasmra_meta["transform"].update(BAD_NORMALIZATION[attack])
    save_safetensors(export, state, crasmra_meta)
    with pytest.raises(CheckpointError, match=r"(mean|std) must be 3 finite numbers"):
        load_model(export)


def test_predict_refuses_a_nan_mean_instead_of_printing_nan(
    full_ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = altered(full_ckpt, tmp_path,
                   lambda c: c["crasmra"]["transform"].update(mean=[math.nan] * 3))
    assert run_cli(["predict", str(ckpt), str(png(tmp_path / "a.png"))]) == 2
    assert "mean must be 3 finite numbers" in one_line_error(capsys)
    assert "nan%" not in capsys.readouterr().out


def test_report_md_escapes_class_names(full_ckpt: dict[str, Any], tmp_path: Path) -> None:
    evil = "evil\x1b[31mRED\x07\rX<script>alert(1)</script>|[link](http://x)"

    def change(c: dict[str, Any]) -> None:
        c["crasmra"]["classes"][0] = evil

    ckpt = altered(full_ckpt, tmp_path, change)
    out = tmp_path / "report"
    assert run_cli(["report", str(ckpt), "--out", str(out), "--quiet",
                    "--option", "test_samples_per_class=2"]) == 0
    md = (out / "report.md").read_text()
    for raw in ("\x1b", "\x07", "\r", "<script>", "[link](http"):
        assert raw not in md, raw
    assert "evil\\\\x1b" in md and "\\<script\\>" in md
    # report.json keeps the names as they are (JSON escapes them itself).
    assert json.loads((out / "report.json").read_text())["per_class"][0]["label"] == evil



@pytest.mark.parametrize("option", ["clutter: -3", "seed: -1", "max_rotation: .nan",
                                    "max_rotation: .inf", "test_samples_per_class: 100000000",
                                    "native_size: 50000", "num_classes: 2.5"])
def test_synthetic_options_are_refused_before_any_worker(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(tiny_fit_args(tmp_path, "--data.num_workers=1",
                                 f"--data.options={{{TINY_OPTIONS}, {option}}}"))
    assert code == 2
    line = one_line_error(capsys)
    assert f"synthetic option {option.split(':')[0]} must be" in line


def test_deeply_nested_safetensors_metadata(full_ckpt: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    # safetensors (from 0.8) refuses a channels-last tensor; crasmra's own writer packs them.
    state = {k: v.contiguous() for k, v in list(full_ckpt["state_dict"].items())[:2]}
    save_file(state, str(path), metadata={"crasmra": "[" * 200_000 + "]" * 200_000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint_file(path)


def test_synthetic_render_cache_is_bounded() -> None:
    from crasmra.data.synthetic import RENDER_CACHE_BYTES, SyntheticFGVC

    ds = SyntheticFGVC("test", num_classes=2, test_samples_per_class=10, image_size=1024)
    assert ds._cache_items == RENDER_CACHE_BYTES // (3 * 1024**2)


@pytest.mark.parametrize(("key", "value"), [("omega", 7.0), ("omega", -0.5), ("omega", math.nan),
                                          ("omega", "half"), ("omega", True), ("delta", 0.0)])
def test_a_stored_omega_or_delta_out_of_range_is_refused_in_one_line(
    key: str, value: object, full_ckpt: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    # The checkpoint's net config decides CRAM's omega for test, resume, predict and export
    # (--model.finetune.cram_suppression trained records it there).
    ckpt = altered(full_ckpt, tmp_path,
                   lambda c: c["crasmra"]["net_config"].update({key: value}))
    with pytest.raises(CheckpointError, match=rf"net_config\.{key}"):
        load_model(ckpt)
    code = run_cli(["test", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 2
    assert f"net_config.{key}" in one_line_error(capsys)
