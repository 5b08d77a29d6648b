"""The weights' moving average along the training steps (``--model.finetune.ema_epochs``)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import build_module
from crasmra.checkpoint import CheckpointError
from crasmra.data import FGVCDataModule
from crasmra.engine import CRASMRAModule
from crasmra.engine.module import EMA_STATE_KEY, EMA_STEPS_KEY
from crasmra.finetune import TrajectoryAverage, ema_decay
from test_engine import TINY_DATA

OPTIONS = {"backbone": "resnet10t", "pretrained": False, "head_channels": 16,
           "head_hidden": 16, "lr_backbone": 0.05, "lr_attention": 0.05, "lr_heads": 0.05}
#: TINY_DATA's training batches per epoch under the trainer's limit below.
STEPS_PER_EPOCH = 2


def _float_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def _average(states: list[dict[str, torch.Tensor]], decay: float,
             start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The moving average the engine must end with, written out step by step."""
    average = dict(start) if start is not None else dict(states[0])
    for state in states if start is not None else states[1:]:
        average = {k: decay * average[k] + (1 - decay) * state[k] for k in average}
    return average


def test_ema_decay_is_the_time_constant_in_epochs() -> None:
    assert ema_decay(1.0, 10) == pytest.approx(math.exp(-0.1))
    assert ema_decay(3.0, 10) == pytest.approx(math.exp(-1 / 30))
    # After `epochs` epochs of steps a weight's share has fallen by e.
    assert ema_decay(2.0, 5) ** 10 == pytest.approx(math.exp(-1))
    for epochs, steps in [(0.0, 10), (-1.0, 10), (1.0, 0)]:
        with pytest.raises(ValueError, match="positive"):
            ema_decay(epochs, steps)


def test_the_average_copies_first_then_decays_and_copies_integer_buffers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = TrajectoryAverage(net, 0.75)
    states = []
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.fill_(float(step))
            net[1].num_batches_tracked.fill_(10 + step)
        states.append(_float_state(net))
        average.update(net)
    assert average.steps == 3
    expected = _average(states, 0.75)
    saved = average.state_dict()
    for key, value in expected.items():
        assert torch.allclose(saved[key], value, atol=1e-6), key
    assert int(saved["1.num_batches_tracked"]) == 12
    # The average is a copy: the network is untouched until copy_to, then equals it.
    assert torch.equal(net[1].running_mean, torch.full((4,), 2.0))
    average.copy_to(net)
    for key, value in expected.items():
        assert torch.allclose(net.state_dict()[key], value, atol=1e-6), key
    # load() continues from a saved average: one more step decays it once more.
    again = TrajectoryAverage(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 0.75)
    again.load(saved, average.steps)
    again.update(net)
    assert again.steps == 4
    for key, value in again.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, expected[key], atol=1e-6), key  # net == expected now
    with pytest.raises(ValueError, match="decay"):
        TrajectoryAverage(net, 1.0)


def test_the_average_stays_out_of_the_module_parameters_and_state() -> None:
    module = build_module(**OPTIONS, num_classes=3, ema_epochs=1.0)
    names = set(dict(module.named_parameters()))
    module._ema = TrajectoryAverage(module.net, 0.5)
    assert set(dict(module.named_parameters())) == names
    assert not any("_ema" in key for key in module.state_dict())


@pytest.mark.parametrize("epochs", [-1.0, float("nan"), float("inf"), True, "3"])
def test_a_bad_ema_epochs_names_its_flag(epochs: object) -> None:
    with pytest.raises(ValueError, match=r"--model\.finetune\.ema_epochs"):
        build_module(backbone="resnet10t", num_classes=3, ema_epochs=epochs)


class _Recorder(L.Callback):
    """The network's weights after every training batch (before the module's own hook, so
    the trained ones, not the average), and when the last validation starts."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: CRASMRAModule, *args: object,
                           ) -> None:
        self.steps.append(_float_state(module.net))

    def on_validation_start(self, trainer: L.Trainer, module: CRASMRAModule) -> None:
        self.validated = _float_state(module.net)


def _fit(root: Path, ema_epochs: float, epochs: int = 2, ckpt_path: str | None = None,
         ) -> tuple[CRASMRAModule, _Recorder]:
    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    module = build_module(**OPTIONS, num_classes=dm.num_classes, ema_epochs=ema_epochs)
    recorder = _Recorder()
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1,
                                  save_last=True)
    trainer = L.Trainer(
        default_root_dir=root, max_epochs=epochs, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[recorder, checkpoints],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, recorder


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-5), key


def test_engine_ends_with_the_moving_average_of_its_steps(tmp_path: Path) -> None:
    trained, plain_steps = _fit(tmp_path / "trained", 0.0)
    assert trained._ema is None
    assert EMA_STATE_KEY not in torch.load(tmp_path / "trained" / "last.ckpt",
                                           weights_only=True)
    averaged, recorder = _fit(tmp_path / "averaged", 1.0)
    # The average changes nothing until the last step: the same steps as without it.
    assert len(recorder.steps) == 2 * STEPS_PER_EPOCH
    _assert_close(recorder.steps[-1], plain_steps.steps[-1])
    decay = math.exp(-1 / STEPS_PER_EPOCH)
    expected = _average(recorder.steps, decay)
    final = _float_state(averaged.net)
    _assert_close(final, expected)
    assert not all(torch.allclose(final[k], v, atol=1e-5)
                   for k, v in recorder.steps[-1].items())
    # The last epoch's validation and its checkpoint see the average; the first epoch's
    # checkpoint holds the average so far, so that a resumed run continues it.
    _assert_close(recorder.validated, expected)
    last = torch.load(tmp_path / "averaged" / "last.ckpt", weights_only=True)
    assert EMA_STATE_KEY not in last
    _assert_close({k[len("net."):]: v for k, v in last["state_dict"].items()
                   if k.startswith("net.")}, expected)
    first = torch.load(tmp_path / "averaged" / "epoch=0.ckpt", weights_only=True)
    assert first[EMA_STEPS_KEY] == STEPS_PER_EPOCH
    _assert_close(first[EMA_STATE_KEY], _average(recorder.steps[:STEPS_PER_EPOCH], decay))


def test_a_resumed_run_continues_the_average_its_checkpoint_holds(tmp_path: Path) -> None:
    _fit(tmp_path / "first", 1.0)
    saved = torch.load(tmp_path / "first" / "epoch=0.ckpt", weights_only=True)
    resumed, recorder = _fit(tmp_path / "resumed", 1.0, epochs=3,
                             ckpt_path=str(tmp_path / "first" / "epoch=0.ckpt"))
    # Epochs 1 and 2 are trained here; the average starts from the saved one.
    assert len(recorder.steps) == 2 * STEPS_PER_EPOCH
    decay = math.exp(-1 / STEPS_PER_EPOCH)
    start = {k: v for k, v in saved[EMA_STATE_KEY].items() if v.is_floating_point()}
    _assert_close(_float_state(resumed.net), _average(recorder.steps, decay, start=start))


@pytest.mark.parametrize("damage", ["weights", "steps"])
def test_a_resumed_run_refuses_a_damaged_average_before_it_trains(
    tmp_path: Path, damage: str,
) -> None:
    _fit(tmp_path / "first", 1.0)
    checkpoint = torch.load(tmp_path / "first" / "epoch=0.ckpt", weights_only=True)
    if damage == "weights":
        state = checkpoint[EMA_STATE_KEY]
        state.pop(next(k for k in state if k.endswith("weight")))
        expected = EMA_STATE_KEY
    else:
        checkpoint[EMA_STEPS_KEY] = -3
        expected = EMA_STEPS_KEY
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError, match=expected):
        _fit(tmp_path / "resumed", 1.0, epochs=3, ckpt_path=str(tmp_path / "damaged.ckpt"))
    assert not (tmp_path / "resumed" / "epoch=1.ckpt").exists()
