"""The training engine: loss goes down, resume repeats a full run, checkpoints are complete."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import build_module, run_cli, tiny_fit_args
from crasmra.data import FGVCDataModule
from crasmra.engine import MONITOR, CRASMRAModule, RNGStateCallback, WarmupCosine
from crasmra.layers import SMRAM

TINY_MODEL = dict(
    backbone="resnet10t",
    pretrained=False,
    head_channels=32,
    head_hidden=32,
    lr_backbone=0.02,
    lr_attention=0.02,
    lr_heads=0.02,
)
TINY_DATA = dict(
    dataset="synthetic",
    batch_size=8,
    num_workers=0,
    image_size=64,
    resize_size=72,
    val_fraction=0.25,
    options={"num_classes": 4, "samples_per_class": 8, "native_size": 64},
)


def _module(dm: FGVCDataModule, **overrides) -> CRASMRAModule:
    kwargs = {**TINY_MODEL, **overrides}
    return build_module(
        num_classes=dm.num_classes,
        classes=dm.classes,
        transform_config=dm.transform_config,
        **kwargs,
    )


def _trainer(root: Path, max_epochs: int, callbacks=(), **kwargs) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(
        dirpath=root / "checkpoints", filename="best", monitor=MONITOR, mode="max", save_last=True
    )
    return L.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ckpt, RNGStateCallback(), *callbacks],
        **kwargs,
    )


class _RecordLoss(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    model = _module(dm, warmup_epochs=0.0)
    record = _RecordLoss()
    trainer = _trainer(
        tmp_path, max_epochs=12, callbacks=[record], overfit_batches=1, limit_val_batches=0
    )
    trainer.fit(model, datamodule=dm)
    first, last = sum(record.losses[:2]) / 2, sum(record.losses[-2:]) / 2
    assert last < 0.7 * first, record.losses


def test_parameter_groups_follow_the_paper(tmp_path: Path) -> None:
    dm = FGVCDataModule(**TINY_DATA)
    model = _module(dm, lr_backbone=2e-4, lr_attention=6e-3, lr_heads=5e-3)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["backbone"]["lr"] == 2e-4
    assert groups["attention"]["lr"] == 6e-3
    assert groups["heads"]["lr"] == 5e-3
    assert groups["smram"]["lr"] == 2e-4  # SPEC: SMRAM learns at the backbone's rate
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}


def test_variant_without_smram_has_no_smram_group() -> None:
    dm = FGVCDataModule(**TINY_DATA)
    model = _module(dm, variant="cram")
    assert model.smram is None
    assert "smram" not in {g["name"] for g in model.parameter_groups()}


def test_plain_variant_learns_at_the_backbone_and_head_rates() -> None:
    dm = FGVCDataModule(**TINY_DATA)
    model = _module(dm, variant="plain", lr_backbone=2e-4, lr_attention=6e-3, lr_heads=5e-3)
    assert model.smram is None and model.head_names == ("classifier", "combined")
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"backbone", "heads"}  # no attention, no SMRAM
    assert groups["backbone"]["lr"] == 2e-4 and groups["heads"]["lr"] == 5e-3
    fc = model.net.backbone.model.fc
    assert {id(p) for p in groups["heads"]["params"]} == {id(fc.weight), id(fc.bias)}
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}


def test_warmup_cosine_schedule() -> None:
    f = WarmupCosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def fresh() -> tuple[FGVCDataModule, CRASMRAModule]:
        L.seed_everything(0)
        dm = FGVCDataModule(**TINY_DATA)
        return dm, _module(dm)

    dm, model = fresh()
    _trainer(tmp_path / "full", max_epochs=3).fit(model, datamodule=dm)
    full = {k: v.clone() for k, v in model.state_dict().items()}

    dm, model = fresh()
    _trainer(tmp_path / "cut", max_epochs=3, callbacks=[_StopAfterFirstEpoch()]).fit(
        model, datamodule=dm
    )
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0

    dm, model = fresh()
    # Move the global RNGs on before resuming: only the checkpoint's RNG state (and the run's
    # seed, which fixes the shuffling per epoch) may decide what follows.
    torch.rand(1000)
    random.random()
    _trainer(tmp_path / "cut", max_epochs=3).fit(model, datamodule=dm, ckpt_path=str(last))
    resumed = model.state_dict()
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, msg=f"{key} differs after resume")


def test_checkpoint_is_self_contained_and_weights_only(tiny_checkpoint: Path) -> None:
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    meta = ckpt["crasmra"]
    assert meta["net_config"]["backbone"] == "resnet10t"
    assert meta["net_config"]["num_classes"] == 4
    assert len(meta["classes"]) == 4
    assert meta["transform"]["image_size"] in (64, [64, 64], (64, 64))
    # SMRAM's state is kept for resuming, beside the network and never inside it
    keys = list(ckpt["state_dict"])
    smram_keys = [k for k in keys if k.startswith("smram.")]
    assert any(k.startswith("smram.phi.") for k in smram_keys)
    assert {k.removeprefix("smram.") for k in smram_keys} == set(SMRAM(32).state_dict())
    assert all(k.startswith(("net.", "smram.")) for k in keys)
    assert not any(".phi." in k or "smram" in k for k in keys if k.startswith("net."))
    # the optimiser, scheduler and loop state needed to resume are there too
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


def test_run_folder_contents(tiny_run: Path) -> None:
    for name in ("config.yaml", "run_info.json", "classes.txt", "metrics.csv", "metrics.json"):
        assert (tiny_run / name).is_file(), name
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert {"crasmra", "torch", "timm", "lightning"} <= set(info["versions"])
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert MONITOR in metrics["best_val"]["metrics"]
    test = metrics["test"]
    for head in ("stage3", "stage4", "stage5", "concat", "combined"):
        assert f"test/{head}_top1" in test
    assert "test/combined_top5" not in test  # only 4 classes: top-5 is undefined
    csv_header = (tiny_run / "metrics.csv").read_text().splitlines()[0]
    assert "val/combined_top1" in csv_header and "train/loss" in csv_header


def test_best_checkpoint_is_chosen_on_validation(tiny_run: Path) -> None:
    best = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    callbacks = {k: v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint")}
    (state,) = callbacks.values()
    assert state["monitor"] == MONITOR == "val/combined_top1"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert best["epoch"] == metrics["best_val"]["epoch"]
    assert float(state["best_model_score"]) == pytest.approx(
        metrics["best_val"]["metrics"][MONITOR]
    )
    assert metrics["selection"] == {"rule": "best_validation", "monitor": MONITOR, "mode": "max"}


def test_resume_with_ckpt_path_last_through_the_cli(tmp_path: Path) -> None:
    assert run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=1")) == 0
    assert run_cli(tiny_fit_args(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2
    # The resumed run appends to the interrupted run's metrics.csv instead of replacing it.
    with (tmp_path / "metrics.csv").open() as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/combined_top1")}
    assert epochs == {"0", "1"}


def test_fine_tune_on_another_class_count(tiny_checkpoint: Path, tmp_path: Path) -> None:
    common = [
        '--data.options={"num_classes": 6, "samples_per_class": 4, "native_size": 64}',
        f"--model.runtime.init_from={tiny_checkpoint}",
    ]
    assert run_cli(tiny_fit_args(tmp_path / "a", *common)) == 2
    assert run_cli(tiny_fit_args(tmp_path / "b", *common, "--model.runtime.reinit_heads=true")) == 0


def test_resume_with_another_class_count_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(
        tiny_fit_args(
            tmp_path,
            '--data.options={"num_classes": 6, "samples_per_class": 4, "native_size": 64}',
            f"--ckpt_path={tiny_checkpoint}",
        )
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "6" in err and "4" in err and "reinit_heads" in err


def test_plain_fit_through_the_cli(plain_run: Path, plain_checkpoint: Path,
                                   tmp_path: Path) -> None:
    from crasmra.demo import format_results_table

    metrics = json.loads((plain_run / "metrics.json").read_text())
    test = metrics["test"]
    assert {k for k in test if k.endswith("_top1")} == {"test/classifier_top1",
                                                        "test/combined_top1"}
    # The combined prediction of a one-head network is that head's.
    assert test["test/classifier_top1"] == test["test/combined_top1"]
    csv_header = (plain_run / "metrics.csv").read_text().splitlines()[0]
    assert "train/classifier_ce" in csv_header and "train/concat_ce" not in csv_header
    ckpt = torch.load(plain_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["crasmra"]["net_config"]["variant"] == "plain"
    assert all(k.startswith("net.backbone.model.") for k in ckpt["state_dict"])
    table = format_results_table(plain_run / "metrics.json", 4).splitlines()
    assert [line.split()[0] for line in table[2:]] == ["classifier", "combined"]
    # Fine-tuning on another class count re-initialises timm's classifier.
    options = '--data.options={"num_classes": 6, "samples_per_class": 4, "native_size": 64}'
    assert run_cli(tiny_fit_args(tmp_path, options, "--model.net.variant=plain",
                                 f"--model.runtime.init_from={plain_checkpoint}",
                                 "--model.runtime.reinit_heads=true")) == 0
