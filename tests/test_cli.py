"""The command line: subcommands, shipped configs, input checks, the demo config and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_cli, tiny_fit_args
from crasmra.cli import build_parser, main

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
RECIPES = [p for p in CONFIGS if p.name not in ("base.yaml", "dataset.yaml")]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("fit", "validate", "test", "demo", *subcommands):
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from crasmra import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_every_shipped_config_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(RECIPES) >= 4 * 3 + 4 * 3 + 1
    for path in RECIPES:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", f"--config={path}", "--print_config"])
        assert exit_info.value.code == 0, path
        resolved = yaml.safe_load(capsys.readouterr().out)
        if path.name == "demo.yaml":
            continue
        if path.name == "imprint-recipe.yaml":
            # The cub100 study's frozen copy of the recipe before the heads started as probes.
            finetune = resolved["model"]["finetune"]
            assert finetune["head_init"] == "imprint" and finetune["probe_below"] == 0
            assert finetune["imprint_transform"] == "train"
            continue
        if path.name == "probe-recipe.yaml":
            # The frozen copy of the recipe before no_steps_below and cram_init neutral.
            finetune = resolved["model"]["finetune"]
            assert finetune["head_init"] == "probe" and finetune["probe_below"] == 6
            assert finetune["no_steps_below"] == 0 and finetune["cram_init"] == "random"
            assert not finetune["imprint_signed"]
            continue
        if path.name == "unsigned-recipe.yaml":
            # The frozen copy of the recipe before imprint_signed.
            finetune = resolved["model"]["finetune"]
            assert finetune["no_steps_below"] == 2 and finetune["cram_init"] == "auto"
            assert not finetune["imprint_signed"]
            continue
        if path.name == "signed-recipe.yaml":
            # The frozen copy of the recipe before cram_suppression trained.
            finetune = resolved["model"]["finetune"]
            assert finetune["imprint_signed"] and finetune["cram_init"] == "auto"
            assert finetune["cram_suppression"] == "always"
            continue
        if path.name == "uncentred-recipe.yaml":
            # The recipe with imprint_centered false, measured and not kept.
            finetune = resolved["model"]["finetune"]
            assert finetune["imprint_signed"] and finetune["cram_init"] == "auto"
            assert finetune["imprint_centered"] is False
            continue
        if path.name == "principal-recipe.yaml":
            # The recipe with head_path_directions principal, measured and not kept.
            finetune = resolved["model"]["finetune"]
            assert finetune["imprint_signed"] and finetune["cram_init"] == "auto"
            assert finetune["head_path_directions"] == "principal"
            continue
        if path.parent.name in ("cub10", "cub100", "finetune"):
            _check_finetune_recipe(path, resolved)
            continue
        if path.stem in TRANSFORMER_RECIPES:
            _check_transformer_recipe(path, resolved)
            continue
        dataset = path.parent.name
        assert resolved["data"]["dataset"] == dataset
        backbone, _, variant = path.stem.partition("-")
        # torchvision's ImageNet weights, named explicitly (a bare name takes timm's default)
        assert resolved["model"]["net"]["backbone"] == f"{backbone}.tv_in1k"
        assert resolved["model"]["net"]["variant"] == (variant or "cra-smra")
        # the paper's recipe, inherited from base.yaml
        assert (
            resolved["model"]["optim"]["lr_backbone"] == 2e-4
            and resolved["model"]["optim"]["lr_attention"] == 6e-3
        )
        assert resolved["data"]["image_size"] == 448 and resolved["data"]["resize_size"] == 550
        # the paper's protocol: centre crop, the whole training split, no validation split
        assert resolved["data"]["random_crop"] is False and resolved["data"]["val_fraction"] == 0
        assert resolved["model"]["net"]["suppress_source"] == "input"
        # none of the fine-tuning family's switches
        finetune = resolved["model"]["finetune"]
        assert finetune["head_init"] == "random" and finetune["combine"] == "mean"
        assert not resolved["model"]["net"]["final_features"]
        assert not resolved["model"]["finetune"]["freeze_backbone_bn"]
        assert resolved["trainer"]["max_epochs"] == 200 and resolved["data"]["batch_size"] == 20
        assert resolved["trainer"]["default_root_dir"].endswith(
            path.stem if variant else f"{path.stem}-cra-smra"
        )


#: Our Transformer recipes (the paper has none): file stem -> (timm weights, crop, resize).
TRANSFORMER_RECIPES = {
    "vit_base": ("vit_base_patch16_224.orig_in21k", 448, 600),
    "swin_base": ("swin_base_patch4_window12_384.ms_in22k_ft_in1k", 384, 510),
}


def _check_transformer_recipe(path: Path, resolved: dict) -> None:
    """A Transformer recipe: named timm weights, the crop of the recipe it follows, the paper's
    CRAM and loss weights, stages that the backbone can be split at."""
    from crasmra.backbones import check_backbone

    weights, crop, resize = TRANSFORMER_RECIPES[path.stem]
    net = resolved["model"]["net"]
    assert resolved["data"]["dataset"] == path.parent.name == "cub"
    assert net["backbone"] == weights and net["pretrained"] is True
    assert net["variant"] == "cra-smra" and (net["omega"], net["delta"]) == (0.5, 0.9)
    assert [resolved["model"]["loss"][k] for k in ("alpha", "beta", "gamma")] == [2.0, 1.0, 1.0]
    assert (resolved["data"]["image_size"], resolved["data"]["resize_size"]) == (crop, resize)
    assert resolved["data"]["random_crop"] is True and resolved["data"]["val_fraction"] == 0
    assert tuple(net["stage_indices"]) == check_backbone(weights, net["stage_indices"], crop)
    assert resolved["trainer"]["default_root_dir"] == f"runs/cub/{path.stem}-cra-smra"


def _check_finetune_recipe(path: Path, resolved: dict) -> None:
    """The real-data family on a CPU: the paper's rates and loss weights, lite0 at 224 px, the
    fine-tuning switches on; configs/cub10 and configs/cub100 only add their data."""
    folder = path.parent.name
    assert resolved["data"]["dataset"] == ("folder" if folder == "finetune" else "cub")
    if folder != "finetune":
        assert str(resolved["data"]["root"]).endswith(f"realdata/{folder}/CUB_200_2011")
    assert resolved["model"]["net"]["variant"] == path.stem
    assert resolved["model"]["net"]["backbone"] == "tf_efficientnet_lite0"
    weights = str(resolved["model"]["net"]["pretrained"])
    assert weights.endswith("tf_efficientnet_lite0.imagenet.safetensors")
    assert resolved["data"]["image_size"] == 224
    for key, value in {"loss.alpha": 2.0, "loss.beta": 1.0, "loss.gamma": 1.0,
                       "net.omega": 0.5, "net.delta": 1.0}.items():
        part, name = key.split(".")
        assert resolved["model"][part][name] == value, key
    for key, value in {"finetune.freeze_backbone_bn": True, "finetune.head_init": "probe",
                       "finetune.imprint_transform": "eval", "finetune.probe_below": 6.0,
                       "finetune.plain_probe_below": 11.0,
                       "finetune.combine": "fitted", "net.final_features": True,
                       "runtime.channels_last": None, "finetune.head_path_init": "identity",
                       "net.head_pool": "avg", "finetune.no_steps_below": 2.0,
                       "finetune.cram_init": "auto", "finetune.imprint_signed": True,
                       "finetune.head_path_directions": "class_means",
                       "finetune.imprint_centered": True, "finetune.wise_alpha": 1.0,
                       "finetune.cram_suppression": "trained"}.items():
        part, name = key.split(".")
        assert resolved["model"][part][name] == value, key
    assert resolved["trainer"]["precision"] is None
    # CRAM's variants train longer, so that the stages after its mask adapt to it; cub100
    # sets its own schedule for every variant.
    epochs = 4 if folder == "cub100" else 12 if path.stem in ("cram", "cra-smra") else 6
    assert resolved["trainer"]["max_epochs"] == epochs
    assert resolved["trainer"]["default_root_dir"] == f"runs/{folder}/{path.stem}"


def test_the_frozen_signed_recipe_is_the_recipe_before_cram_suppression() -> None:
    from crasmra.config import load_config
    from crasmra.sweep.run import base_fingerprint

    # sweeps/cub100-fewshot-signed.yaml's runs were trained from configs/cub100/cra-smra.yaml
    # before it set cram_suppression: the same fingerprint lets that sweep resume them.
    live = load_config(REPO / "configs" / "cub100" / "cra-smra.yaml")
    assert live["model"]["finetune"].pop("cram_suppression") == "trained"
    # plain_probe_below changes plain alone; that sweep's plain runs are the recipe before it.
    assert live["model"]["finetune"].pop("plain_probe_below") == 11
    frozen = REPO / "configs" / "cub100" / "signed-recipe.yaml"
    assert base_fingerprint(live) == base_fingerprint(str(frozen))


def test_demo_config_file_matches_the_demo_command() -> None:
    from crasmra.config import load_config
    from crasmra.demo import DEMO_CONFIG

    # One recipe: configs/demo.yaml names the package's demo.yaml, which `crasmra demo` reads.
    assert load_config(REPO / "configs" / "demo.yaml") == DEMO_CONFIG
    assert DEMO_CONFIG["trainer"]["max_epochs"] == 24


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--model.net.backbone=resnet5O", "resnet50"),
        ("--model.net.variant=cbam2", "cra-smra"),
        ("--model.net.omega=1.5", "omega"),
        ("--model.net.delta=0", "delta"),
        ("--model.loss.alpha=-1", "alpha"),
        ("--model.optim.lr_heads=0", "lr_heads"),
        ("--data.batch_size=0", "batch_size"),
        ("--model.optim.lr_backbone=1e300", "lr_backbone must be at most"),
        ("--model.net.backbone=maxvit_tiny_tf_224", "neither dynamic_img_size nor strict_img_size"),
        ("--trainer.max_epochs=-5", "max_epochs"),
        ("--data.image_size=100000", "at most 4096 pixels"),
    ],
)
def test_bad_hyperparameters_fail_before_training(
    flag: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(tiny_fit_args(tmp_path, flag))
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert not (tmp_path / "checkpoints").exists()


def test_wrong_dataset_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    code = run_cli(
        tiny_fit_args(
            tmp_path / "run",
            "--data.dataset=cub",
            f"--data.root={tmp_path / 'data'}",
            "--data.options=null",
        )
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "images.txt" in err and "CUB" in err


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = run_cli(tiny_fit_args(blocker / "run"))
    assert code == 2
    assert "Cannot write --trainer.default_root_dir" in capsys.readouterr().err


def test_fit_refuses_to_replace_an_earlier_run(tiny_run: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}
    assert run_cli(tiny_fit_args(tiny_run)) == 2
    err = capsys.readouterr().err
    assert "earlier run" in err and "--ckpt_path last" in err and "--overwrite" in err
    after = {p.name: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}
    assert after == before


def test_missing_resume_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tiny_fit_args(tmp_path, "--ckpt_path=last")) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_validate_and_test_on_a_checkpoint(tiny_run: Path, tiny_checkpoint: Path) -> None:
    from conftest import TINY_CONFIG

    for command in ("validate", "test"):
        code = run_cli(
            [
                command,
                f"--config={TINY_CONFIG}",
                f"--trainer.default_root_dir={tiny_run}",
                f"--ckpt_path={tiny_checkpoint}",
            ]
        )
        assert code == 0
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    best_val = metrics["best_val"]["metrics"]["val/combined_top1"]
    validated = json.loads((tiny_run / "validate" / "metrics.json").read_text())
    assert validated["validate"]["val/combined_top1"] == pytest.approx(best_val)
    assert "validate" not in metrics and (tiny_run / "test" / "metrics.json").is_file()


@pytest.mark.slow
def test_two_process_ddp_on_cpu_agrees_on_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    root = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "crasmra.cli",
        *tiny_fit_args(
            root,
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_epochs=1",
            "--test_after_fit=false",
        ),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((root / "metrics.json").read_text())
    ddp_top1 = metrics["best_val"]["metrics"]["val/combined_top1"]
    best = root / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["epoch"] == 0
    # A single process evaluating the same checkpoint on the whole validation split must agree
    # with the metric the two processes computed together.
    assert (
        run_cli(
            [
                "validate",
                f"--config={REPO / 'tests/configs/tiny.yaml'}",
                f"--trainer.default_root_dir={root}",
                f"--ckpt_path={best}",
            ]
        )
        == 0
    )
    single = json.loads((root / "validate" / "metrics.json").read_text())["validate"][
        "val/combined_top1"
    ]
    assert single == pytest.approx(ddp_top1)


def _tiny_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the demo's config so that the command line itself can be tested in seconds."""
    import crasmra.demo

    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    monkeypatch.setattr(crasmra.demo, "DEMO_CONFIG", config)


def test_demo_reruns_with_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _tiny_demo(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", "--seed", "3"]) == 0
    assert "seed_everything: 3" in (out / "config.yaml").read_text()
    first = (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()
    # A second run names the one flag that replaces the first, and leaves it untouched.
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crasmra demo --overwrite" in err[0]
    assert (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns == first
    assert main(["demo", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns != first
    assert "seed_everything: 0" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "flag",
    [
        "--trainer.callbacks+=this.Nothing",
        "--config={trainer: {callbacks: [{class_path: this.Nothing}]}}",
        "--trainer.logger={class_path: this.Nothing}",
    ],
)
def test_a_class_path_outside_the_allowed_packages_is_never_imported(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `this` prints the Zen of Python when imported: the side effect a config must not cause.
    sys.modules.pop("this", None)
    code = run_cli(tiny_fit_args(tmp_path, flag))
    captured = capsys.readouterr()
    assert code == 2
    assert "this" not in sys.modules and "Zen of Python" not in captured.out
    assert "CRASMRA_CLASS_PACKAGES" in captured.err


def test_a_class_path_of_an_allowed_package_still_works(tmp_path: Path) -> None:
    flag = "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"
    assert run_cli(tiny_fit_args(tmp_path, flag, "--test_after_fit=false")) == 0
