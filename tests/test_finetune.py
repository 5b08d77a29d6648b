"""Fine-tuning a pretrained backbone: linear probing first, then the whole network."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import build_module
from crasmra.data import FGVCDataModule
from crasmra.engine import CRASMRAModule
from test_engine import TINY_DATA as ENGINE_TINY_DATA

# The engine tests' tiny synthetic set, trained on whole (no validation split).
TINY_DATA = {**ENGINE_TINY_DATA, "val_fraction": 0.0}


def _fit(tmp_path: Path, epochs: int, callbacks: list[L.Callback] | None = None,
         **model_kwargs) -> tuple[CRASMRAModule, CRASMRAModule]:
    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    options = {"backbone": "resnet10t", "pretrained": False, "num_classes": dm.num_classes,
               "head_channels": 16, "head_hidden": 16, "lr_backbone": 0.05,
               "lr_attention": 0.05, "lr_heads": 0.05, "weight_decay": 1e-3}
    module = build_module(**{**options, **model_kwargs})
    initial = copy.deepcopy(module)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=dm)
    return initial, module


def _changed(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, bool]:
    """Per state-dict entry (weights and BatchNorm statistics): did training change it?"""
    a, b = before.state_dict(), after.state_dict()
    return {k: not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()}


@pytest.mark.parametrize("variant", ["cra-smra", "plain"])
def test_frozen_epochs_leave_the_backbone_as_loaded(tmp_path: Path, variant: str) -> None:
    initial, trained = _fit(tmp_path, epochs=1, variant=variant, freeze_backbone_epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    classifier_keys = {"model." + k for k in ("fc.weight", "fc.bias")}
    frozen = {k: v for k, v in backbone.items() if k not in classifier_keys}
    assert frozen and not any(frozen.values()), [k for k, v in frozen.items() if v]
    # BatchNorm statistics are part of what the backbone knows: they stay too.
    assert any(k.endswith("running_mean") for k in frozen)
    if variant == "plain":
        assert all(backbone[k] for k in classifier_keys)  # timm's classifier trains
    else:
        heads = _changed(initial.net.heads, trained.net.heads)
        attention = _changed(initial.net.attention, trained.net.attention)
        assert all(v for k, v in heads.items() if k.endswith("weight"))
        assert any(attention.values())


def test_backbone_is_fine_tuned_after_the_frozen_epochs(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=2, freeze_backbone_epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    weights = [v for k, v in backbone.items() if k.endswith("conv1.weight")]
    assert weights and all(weights)
    assert not trained.backbone_frozen
    assert all(p.requires_grad for p in trained.net.parameters())


def test_without_freezing_the_backbone_trains_from_the_start(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    assert all(v for k, v in backbone.items() if k.endswith("conv1.weight"))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_freeze_backbone_epochs_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="freeze_backbone_epochs"):
        build_module(backbone="resnet10t", num_classes=3, freeze_backbone_epochs=bad)


def test_frozen_batchnorm_statistics_with_a_training_backbone(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=1, freeze_backbone_bn=True)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    stats = {k: v for k, v in backbone.items() if k.endswith(("running_mean", "running_var"))}
    assert stats and not any(stats.values())
    # Their scale and shift, and every convolution, still train.
    assert all(v for k, v in backbone.items() if k.endswith("conv1.weight"))
    assert any(v for k, v in backbone.items() if k.endswith("bn1.weight"))
    # The heads' own BatchNorm layers are not the backbone's: they keep training mode.
    heads = _changed(initial.net.heads, trained.net.heads)
    assert any(v for k, v in heads.items() if k.endswith("running_mean"))


def test_the_paper_recipe_updates_the_backbones_batchnorm_statistics(tmp_path: Path) -> None:
    """By default (the paper's recipe) the backbone's BatchNorm layers train: their running
    statistics follow the batches, as in any fine-tune that does not freeze them."""
    module = build_module(backbone="resnet10t", num_classes=3)
    assert module.finetune.freeze_backbone_bn is False
    assert module.hparams["finetune"]["freeze_backbone_bn"] is False
    module.train()
    norms = [m for m in module.net.backbone.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.training for m in norms)
    initial, trained = _fit(tmp_path, epochs=1)
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    stats = {k: v for k, v in backbone.items() if k.endswith(("running_mean", "running_var"))}
    assert stats and all(stats.values()), [k for k, v in stats.items() if not v]


class _BackboneModes(L.Callback):
    """The training flags of the backbone's BatchNorm layers and its requires_grad, per batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        norms = [m for m in module.net.backbone.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        conv = next(p for n, p in module.net.backbone.named_parameters() if "conv" in n)
        self.seen.append((trainer.global_step, any(m.training for m in norms), conv.requires_grad))


def test_a_run_resumed_inside_an_epoch_keeps_the_freezing_and_batchnorm_policies(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt_path: str | None, max_steps: int) -> _BackboneModes:
        L.seed_everything(0)
        dm = FGVCDataModule(**TINY_DATA)
        module = build_module(backbone="resnet10t", num_classes=dm.num_classes, head_channels=8,
                               head_hidden=8, freeze_backbone_bn=True, freeze_backbone_epochs=1)
        modes = _BackboneModes()
        trainer = L.Trainer(
            default_root_dir=tmp_path, max_epochs=2, max_steps=max_steps, accelerator="cpu",
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[modes, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1,
                                              save_top_k=-1, filename="{step}")],
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return modes

    fit(None, max_steps=1)  # one step of the first (frozen) epoch, then "killed"
    resumed = fit(str(tmp_path / "ck" / "step=1.ckpt"), max_steps=3)
    # The resumed steps of the first epoch still have the backbone frozen and its BatchNorm
    # layers in eval mode.
    assert resumed.seen[0][0] == 1
    assert resumed.seen[0][1:] == (False, False)


def _classifier_keys(module: CRASMRAModule) -> set[str]:
    ids = {id(p) for layer in module.net.classifier_layers().values() for p in layer.parameters()}
    return {name for name, p in module.net.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(("variant", "thresholds"), [
    ("cra-smra", {"probe_below": 9}),
    ("plain", {"probe_below": 9}),
    ("plain", {"probe_below": 8, "plain_probe_below": 9}),
])
def test_below_probe_below_images_per_class_only_the_classifiers_train(
    tmp_path: Path, variant: str, thresholds: dict[str, int]
) -> None:
    # The tiny set has 8 training images per class: 9 is above that.
    initial, trained = _fit(tmp_path, epochs=1, variant=variant, **thresholds)
    assert trained.backbone_policy.classifiers_only
    changed = _changed(initial.net, trained.net)
    classifiers = _classifier_keys(trained)
    assert classifiers and all(changed[k] for k in classifiers)
    rest = {k: v for k, v in changed.items() if k not in classifiers}
    # Everything else, the heads' and attention's BatchNorm statistics included, stays.
    assert any(k.endswith("running_mean") for k in rest)
    assert not any(rest.values()), [k for k, v in rest.items() if v]


def test_at_probe_below_images_per_class_the_whole_network_trains(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=1, probe_below=8)
    assert not trained.backbone_policy.classifiers_only
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    assert all(v for k, v in backbone.items() if k.endswith("conv1.weight"))
    heads = _changed(initial.net.heads, trained.net.heads)
    assert any(v for k, v in heads.items() if k.endswith("running_mean"))


class _StateAtFirstBatch(L.Callback):
    """The network's state when the first batch arrives (after imprinting)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            self.state = copy.deepcopy(pl_module.net.state_dict())


@pytest.mark.parametrize(
    ("variant", "plain_probe_below", "classifiers_only"),
    [("plain", 9, True), ("plain", 8, False), ("plain", None, False),
     ("baseline", 9, False), ("cra-smra", 9, False)],
)
def test_plain_probe_below_sets_the_threshold_of_plain_only(
        variant: str, plain_probe_below: float | None, classifiers_only: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    # probe_below 8 with 8 training images per class: everything trains, unless the plain
    # variant has a threshold of its own above 8.
    module = build_module(backbone="resnet10t", num_classes=3, variant=variant,
                          head_channels=8, head_hidden=8, probe_below=8,
                          plain_probe_below=plain_probe_below)
    with caplog.at_level(logging.INFO, logger="crasmra.engine.freezing"):
        module.backbone_policy.choose_regime(module.net, train_images=24)
    assert module.backbone_policy.classifiers_only is classifiers_only
    assert not module.backbone_policy.no_steps
    # The log names the flag that decided.
    assert ("--model.finetune.plain_probe_below 9" in caplog.text) is classifiers_only


@pytest.mark.parametrize("variant", ["cra-smra", "plain"])
def test_below_no_steps_below_the_fitted_probes_are_the_result(tmp_path: Path,
                                                               variant: str) -> None:
    start = _StateAtFirstBatch()
    initial, trained = _fit(tmp_path, epochs=2, callbacks=[start], variant=variant,
                            no_steps_below=9, head_init="probe")
    assert trained.backbone_policy.no_steps
    final = trained.net.state_dict()
    # Nothing moved after the probes were fitted: no weight, no BatchNorm statistic.
    changed = [k for k, v in start.state.items() if not torch.equal(v, final[k])]
    assert not changed, changed
    classifiers = _classifier_keys(trained)
    # ...and the probes were fitted: the classifiers are not PyTorch's random start.
    before = initial.net.state_dict()
    assert classifiers and all(not torch.equal(start.state[k], before[k]) for k in classifiers)


def test_from_no_steps_below_on_the_network_trains(tmp_path: Path) -> None:
    initial, trained = _fit(tmp_path, epochs=1, no_steps_below=8, head_init="probe")
    assert not trained.backbone_policy.no_steps
    backbone = _changed(initial.net.backbone, trained.net.backbone)
    assert all(v for k, v in backbone.items() if k.endswith("conv1.weight"))


def test_no_steps_below_needs_fitted_classifiers() -> None:
    with pytest.raises(ValueError, match=r"--model\.finetune\.head_init probe"):
        build_module(backbone="resnet10t", num_classes=3, no_steps_below=2)


@pytest.mark.parametrize("flag", ["probe_below", "plain_probe_below", "no_steps_below"])
@pytest.mark.parametrize("bad", [-1, float("nan"), True, "2"])
def test_probe_below_is_validated(flag: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"--model\.finetune\.{flag}"):
        build_module(backbone="resnet10t", num_classes=3, **{flag: bad})


# ---------------------------------------------------------------------------------------------
# CRAM's neutral start (--model.finetune.cram_init neutral)
# ---------------------------------------------------------------------------------------------
def test_neutral_cram_start_gives_equal_importances_and_one_suppressed_channel() -> None:
    from crasmra.finetune import neutral_cram_start
    from crasmra.layers.cram import CRAM, suppression_mask
    from crasmra.model import create_model

    torch.manual_seed(0)
    net = create_model("resnet10t", 5, pretrained=False, variant="cra-smra", delta=1.0,
                       head_channels=16, head_hidden=16).eval()
    crams = [m for m in net.attention if isinstance(m, CRAM)]
    x = [torch.randn(2, m.in_channels, 6, 6).abs() for m in crams]
    before = [m.channel_importance(xi).flatten(1) for m, xi in zip(crams, x, strict=True)]
    weights = [m.mlp[0].weight.clone() for m in crams]
    assert neutral_cram_start(net) == len(crams) == 3
    for m, xi, old, w in zip(crams, x, before, weights, strict=True):
        importance = m.channel_importance(xi).flatten(1)  # (B, C)
        # A random start spreads the importances; the neutral one keeps them near 0.5.
        assert (old - 0.5).abs().max() > 0.05
        assert (importance - 0.5).abs().max() < 5e-3
        # Not a tie: the mask still damps one channel per sample (delta 1), not all of them.
        mask = suppression_mask(importance, m.omega, m.delta)
        assert torch.equal((mask < 1).sum(dim=1), torch.ones(2, dtype=torch.long))
        torch.testing.assert_close(importance * xi[:, :, 0, 0], 0.5 * xi[:, :, 0, 0],
                                   atol=5e-3 * xi.max().item(), rtol=0)
        assert torch.equal(m.mlp[0].weight, w)  # only the last layer is scaled


def test_neutral_cram_start_applies_before_the_first_step_only(tmp_path: Path) -> None:
    from crasmra.layers.cram import CRAM

    torch.manual_seed(0)
    initial, trained = _fit(tmp_path, epochs=1, variant="cra-smra", cram_init="neutral",
                            lr_attention=1e-12)
    for before, after in zip(initial.net.attention, trained.net.attention, strict=True):
        assert isinstance(after, CRAM)
        # A vanishing rate for the attention modules: the run ends with the start it was given.
        torch.testing.assert_close(after.mlp[-1].weight, before.mlp[-1].weight * 1e-3)
        torch.testing.assert_close(after.mlp[0].weight, before.mlp[0].weight)


def test_unknown_cram_init_is_refused_naming_the_flag() -> None:
    from crasmra.engine import FinetuneConfig

    with pytest.raises(ValueError, match=r"--model\.finetune\.cram_init"):
        FinetuneConfig(cram_init="zero")  # type: ignore[arg-type]


@pytest.mark.parametrize(("probe_below", "neutral"), [(9, True), (8, False)])
def test_auto_cram_init_is_neutral_only_where_cram_does_not_train(
        tmp_path: Path, probe_below: int, neutral: bool) -> None:
    from crasmra.layers.cram import CRAM

    # The tiny set has 8 training images per class: below 9 CRAM does not train, at 8 it does.
    start = _StateAtFirstBatch()
    initial, _ = _fit(tmp_path, epochs=1, callbacks=[start], cram_init="auto",
                      probe_below=probe_below)
    for i, module in enumerate(initial.net.attention):
        assert isinstance(module, CRAM)
        key = f"attention.{i}.mlp.2.weight"
        expected = module.mlp[-1].weight * (1e-3 if neutral else 1.0)
        torch.testing.assert_close(start.state[key], expected)


# ---------------------------------------------------------------------------------------------
# The paper heads' probes on the pairs' differences (--model.finetune.imprint_signed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_imprint_signed_reaches_the_classifiers_a_run_starts_with(tmp_path: Path,
                                                                   signed: bool) -> None:
    _, trained = _fit(tmp_path, epochs=1, no_steps_below=9, head_init="probe",
                      head_path_init="identity", imprint_signed=signed)
    # K classes: every head keeps the K - 1 directions of its centred class means, as +/- pairs.
    r = trained.net.num_classes - 1
    for name, layer in trained.net.classifier_layers().items():
        w = layer.weight.detach()
        mirrored = torch.equal(w[:, r : 2 * r], -w[:, :r])
        mirrored = mirrored and not torch.count_nonzero(w[:, 2 * r :])
        assert mirrored == signed, name


@pytest.mark.parametrize("directions", ["class_means", "principal"])
def test_head_path_directions_reaches_the_projections_a_run_starts_with(
    tmp_path: Path, directions: str
) -> None:
    _, trained = _fit(tmp_path, epochs=1, no_steps_below=9, head_init="probe",
                      head_path_init="identity", head_path_directions=directions)
    net = trained.net
    for attention in net.attention:
        w = attention.conv_layer[0].weight.detach().flatten(1)  # (C_a, C)
        kept = int(torch.count_nonzero(w.abs().sum(dim=1))) // 2
        # K classes: K - 1 class-mean directions, more with the principal ones.
        if directions == "class_means":
            assert kept == net.num_classes - 1
        else:
            assert kept > net.num_classes - 1


# ---------------------------------------------------------------------------------------------
# CRAM's suppression only where CRAM trains (--model.finetune.cram_suppression trained)
# ---------------------------------------------------------------------------------------------
def test_unknown_cram_suppression_is_refused_naming_the_flag() -> None:
    from crasmra.engine import FinetuneConfig

    with pytest.raises(ValueError, match=r"--model\.finetune\.cram_suppression"):
        FinetuneConfig(cram_suppression="never")  # type: ignore[arg-type]


class _OmegaAtFirstBatch(L.Callback):
    """The omega of every CRAM module, and the network's config, when the first batch arrives."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            self.modules = [m.omega for m in pl_module.net.attention]
            self.config = pl_module.net.config["omega"]


@pytest.mark.parametrize(("suppression", "probe_below", "omega"),
                         [("trained", 9, 1.0), ("trained", 8, 0.5), ("always", 9, 0.5)])
def test_cram_suppression_trained_lifts_the_mask_only_where_cram_does_not_train(
        tmp_path: Path, suppression: str, probe_below: int, omega: float) -> None:
    # The tiny set has 8 training images per class: below 9 CRAM does not train, at 8 it does.
    first = _OmegaAtFirstBatch()
    _, trained = _fit(tmp_path, epochs=1, callbacks=[first], variant="cra-smra", omega=0.5,
                      cram_init="auto", cram_suppression=suppression, probe_below=probe_below,
                      head_init="imprint")
    assert first.modules == [omega] * 3 and first.config == omega
    assert [m.omega for m in trained.net.attention] == [omega] * 3
    assert trained.net.config["omega"] == omega


def test_cram_suppression_trained_reaches_checkpoints_tests_resumed_runs_and_predictions(
        tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from crasmra.inference import load_model

    # 6 training images per class (a quarter held out): below probe_below 9 CRAM does not train.
    options = {"backbone": "resnet10t", "pretrained": False, "variant": "cra-smra",
               "head_channels": 16, "head_hidden": 16, "omega": 0.5, "probe_below": 9,
               "cram_init": "auto", "cram_suppression": "trained", "head_init": "imprint"}

    def trainer(root: Path, epochs: int = 1) -> L.Trainer:
        return L.Trainer(default_root_dir=root, max_epochs=epochs, accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=2, num_sanity_val_steps=0,
                         callbacks=[ModelCheckpoint(dirpath=root, save_last=True)])

    L.seed_everything(0)
    dm = FGVCDataModule(**ENGINE_TINY_DATA)
    trained = build_module(**options, num_classes=dm.num_classes)
    trainer(tmp_path / "run").fit(trained, datamodule=dm)
    last = tmp_path / "run" / "last.ckpt"
    stored = torch.load(last, weights_only=True)
    assert stored["crasmra"]["net_config"]["omega"] == 1.0
    assert stored["hyper_parameters"]["net"]["omega"] == 0.5  # the configuration as given
    # Predict and export rebuild the network from the checkpoint's net config.
    assert [m.omega for m in load_model(last).attention] == [1.0] * 3
    # A test from the run's configuration (omega 0.5) measures the network that was trained.
    expected = trainer(tmp_path / "test").test(trained, datamodule=dm, verbose=False)
    tested = build_module(**options, num_classes=dm.num_classes)
    got = trainer(tmp_path / "test").test(tested, datamodule=dm, ckpt_path=str(last),
                                          verbose=False)
    assert [m.omega for m in tested.net.attention] == [1.0] * 3
    assert got == expected
    # A resumed run keeps training (and validating) the network it resumed.
    resumed = build_module(**options, num_classes=dm.num_classes)
    trainer(tmp_path / "resumed", epochs=2).fit(resumed, datamodule=dm, ckpt_path=str(last))
    assert [m.omega for m in resumed.net.attention] == [1.0] * 3
    assert resumed.net.config["omega"] == 1.0


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "1"])
def test_set_omega_refuses_a_factor_outside_the_unit_interval(bad: object) -> None:
    from crasmra.model import create_model

    net = create_model("resnet10t", 3, pretrained=False, variant="cra-smra", head_channels=16,
                       head_hidden=16)
    with pytest.raises(ValueError, match="omega"):
        net.set_omega(bad)  # type: ignore[arg-type]
    assert [m.omega for m in net.attention] == [0.5] * 3 and net.config["omega"] == 0.5
    assert net.set_omega(1) == 3
    assert [m.omega for m in net.attention] == [1.0] * 3 and net.config["omega"] == 1.0
    plain = create_model("resnet10t", 3, pretrained=False, variant="plain")
    assert plain.set_omega(1.0) == 0
