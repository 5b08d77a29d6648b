"""Mixing the trained weights with the starting ones (``--model.finetune.wise_alpha``)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import build_module
from crasmra.data import FGVCDataModule
from crasmra.engine import CRASMRAModule
from crasmra.engine.module import WISE_START_KEY
from crasmra.finetune import mix_weights, snapshot_state
from test_engine import TINY_DATA

OPTIONS = {"backbone": "resnet10t", "pretrained": False, "head_channels": 16,
           "head_hidden": 16, "lr_backbone": 0.05, "lr_attention": 0.05, "lr_heads": 0.05}


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _float_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def test_mix_weights_interpolates_every_float_tensor_and_keeps_integer_buffers() -> None:
    torch.manual_seed(0)
    net = _small_net()
    start = snapshot_state(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(7)
    trained = _float_state(net)
    mix_weights(net, start, 0.25)
    for key, value in _float_state(net).items():
        expected = 0.75 * start[key] + 0.25 * trained[key]
        assert torch.allclose(value, expected, atol=1e-6), key
    assert net[1].running_mean.tolist() == pytest.approx([0.25 * 2.0] * 4)
    assert int(net[1].num_batches_tracked) == 7


@pytest.mark.parametrize(("alpha", "which"), [(1.0, "trained"), (0.0, "start")])
def test_mix_weights_at_the_ends_is_one_of_the_two(alpha: float, which: str) -> None:
    torch.manual_seed(0)
    net = _small_net()
    start = snapshot_state(net)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    trained = _float_state(net)
    mix_weights(net, start, alpha)
    expected = trained if which == "trained" else start
    assert all(torch.equal(v, expected[k]) for k, v in _float_state(net).items())


def test_mix_weights_refuses_a_start_of_another_network() -> None:
    net = _small_net()
    start = snapshot_state(net)
    with pytest.raises(ValueError, match="alpha"):
        mix_weights(net, start, 1.5)
    with pytest.raises(ValueError, match="missing"):
        mix_weights(net, {k: v for k, v in start.items() if k != "0.bias"}, 0.5)
    start["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"0\.weight"):
        mix_weights(net, start, 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_a_bad_wise_alpha_names_its_flag(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"--model\.finetune\.wise_alpha"):
        build_module(backbone="resnet10t", num_classes=3, wise_alpha=alpha)


class _LastValidation(L.Callback):
    """The network's weights when the last epoch's validation starts."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_validation_start(self, trainer: L.Trainer, module: CRASMRAModule) -> None:
        self.state = _float_state(module.net)


def _fit(root: Path, alpha: float, epochs: int = 2, ckpt_path: str | None = None,
         ) -> tuple[CRASMRAModule, CRASMRAModule, _LastValidation]:
    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    module = build_module(**OPTIONS, num_classes=dm.num_classes, wise_alpha=alpha)
    initial = copy.deepcopy(module)
    last_validation = _LastValidation()
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1,
                                  save_last=True)
    trainer = L.Trainer(
        default_root_dir=root, max_epochs=epochs, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
        limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[last_validation, checkpoints],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return initial, module, last_validation


def test_engine_ends_with_the_mix_of_the_start_and_the_trained_weights(tmp_path: Path) -> None:
    initial, trained, _ = _fit(tmp_path / "trained", 1.0)
    start = _float_state(initial.net)
    trained_state = _float_state(trained.net)
    moved = [k for k in start if not torch.equal(start[k], trained_state[k])]
    assert moved  # training changed the weights, so the mix is not trivially either end
    _, restored, _ = _fit(tmp_path / "start", 0.0)
    assert all(torch.equal(v, start[k]) for k, v in _float_state(restored.net).items())
    _, mixed, last_validation = _fit(tmp_path / "mixed", 0.25)
    mixed_state = _float_state(mixed.net)
    for key in moved:
        expected = torch.lerp(start[key], trained_state[key], 0.25)
        assert torch.allclose(mixed_state[key], expected, atol=1e-5), key
    # The last epoch's validation and its checkpoint see the mix; the first epoch's
    # checkpoint still carries the start, so that a resumed run can mix.
    assert all(torch.equal(v, mixed_state[k]) for k, v in last_validation.state.items())
    last = torch.load(tmp_path / "mixed" / "last.ckpt", weights_only=True)
    assert WISE_START_KEY not in last
    assert all(torch.equal(last["state_dict"]["net." + k], v) for k, v in mixed_state.items())
    first = torch.load(tmp_path / "mixed" / "epoch=0.ckpt", weights_only=True)
    assert all(torch.equal(first[WISE_START_KEY][k], v) for k, v in start.items())


def test_a_resumed_run_mixes_with_the_start_its_checkpoint_holds(tmp_path: Path) -> None:
    initial, _, _ = _fit(tmp_path / "first", 0.0)
    start = _float_state(initial.net)
    _, resumed, _ = _fit(tmp_path / "resumed", 0.0, epochs=3,
                         ckpt_path=str(tmp_path / "first" / "epoch=0.ckpt"))
    # alpha 0 restores the start: the one saved in the checkpoint, not the resumed
    # module's own random initialisation.
    assert all(torch.equal(v, start[k]) for k, v in _float_state(resumed.net).items())


def test_a_resumed_run_refuses_a_damaged_start_before_it_trains(tmp_path: Path) -> None:
    from crasmra.checkpoint import CheckpointError

    _fit(tmp_path / "first", 0.0)
    checkpoint = torch.load(tmp_path / "first" / "epoch=0.ckpt", weights_only=True)
    start = checkpoint[WISE_START_KEY]
    start.pop(next(k for k in start if k.endswith("weight")))
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError, match=WISE_START_KEY):
        _fit(tmp_path / "resumed", 0.0, epochs=3, ckpt_path=str(tmp_path / "damaged.ckpt"))
    assert not (tmp_path / "resumed" / "epoch=1.ckpt").exists()


def test_default_wise_alpha_keeps_the_trained_weights_and_no_start_in_checkpoints(
    tmp_path: Path,
) -> None:
    initial, trained, _ = _fit(tmp_path, 1.0, epochs=1)
    assert trained._wise_start is None
    assert WISE_START_KEY not in torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not all(torch.equal(v, _float_state(trained.net)[k])
                   for k, v in _float_state(initial.net).items())
