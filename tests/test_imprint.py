"""Weight imprinting of the heads and CRAM's suppression warm-up (crasmra.finetune)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_module
from crasmra.data import FGVCDataModule
from crasmra.finetune import (
    SuppressionWarmup,
    calibrate_batchnorm,
    classifier_layers,
    imprint_classifiers,
    imprint_linear,
)
from crasmra.layers import CRAM
from crasmra.model import create_model
from test_engine import TINY_DATA as ENGINE_TINY_DATA

TINY_DATA = {**ENGINE_TINY_DATA, "val_fraction": 0.0}


def _batches(num_classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0):
    """Fixed labelled batches of noise images, two batches per call."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_classes * per_class, 3, size, size, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    # Give every class its own colour shift, so that the features separate them.
    images += labels.view(-1, 1, 1, 1).float() * 0.8
    half = images.shape[0] // 2
    perm = torch.randperm(images.shape[0], generator=g)
    images, labels = images[perm], labels[perm]
    return lambda: [(images[:half], labels[:half]), (images[half:], labels[half:])]


def _net(variant: str = "cra-smra", num_classes: int = 3):
    torch.manual_seed(0)
    return create_model("resnet10t", num_classes, variant=variant, head_channels=16, head_hidden=16)


def _training_accuracy(net) -> float:
    """Top-1 of ``net``'s combined prediction, in eval mode, on :func:`_batches`' images."""
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for images, target in _batches()():
            correct += int((net(images).probs.argmax(1) == target).sum())
            total += len(target)
    return correct / total


def test_imprint_linear_is_the_centred_cosine_nearest_class_mean() -> None:
    torch.manual_seed(0)
    means = torch.randn(4, 6)
    center = torch.randn(6)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        imprint_linear(layer, means, center, scale=3.0)
    expected = 3.0 * F.normalize(means - center, dim=1)
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    assert torch.allclose(layer.bias, -(expected @ center), atol=1e-5)
    h = torch.randn(50, 6)
    cos = F.normalize(h - center, dim=1) @ F.normalize(means - center, dim=1).T
    assert torch.equal(layer(h).argmax(1), cos.argmax(1))


def test_imprint_linear_gives_absent_classes_zero_logits() -> None:
    layer = nn.Linear(3, 2)
    present = torch.tensor([True, False])
    with torch.no_grad():
        imprint_linear(layer, torch.randn(2, 3), torch.zeros(3), 1.0, present)
    assert torch.count_nonzero(layer.weight[1]) == 0 and float(layer.bias[1].detach()) == 0.0


@pytest.mark.parametrize("variant", ["cra-smra", "baseline", "plain"])
def test_imprinted_weights_are_the_normalised_class_means_of_each_heads_input(
    variant: str,
) -> None:
    net = _net(variant)
    batches = _batches()
    scale = 7.0
    imprint_classifiers(net, batches, num_classes=3, logit_scale=scale)
    layers = classifier_layers(net)
    assert set(layers) == set(net.head_names)
    # Recompute each head's input features independently, in eval mode.
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, a, n=name: captured[n].append(a[0]))
        for name, layer in layers.items()
    ]
    net.eval()
    labels = []
    with torch.no_grad():
        for images, target in batches():
            net(images)
            labels.append(target)
    for h in hooks:
        h.remove()
    y = torch.cat(labels)
    for name, layer in layers.items():
        feats = torch.cat(captured[name])
        means = torch.stack([feats[y == k].mean(0) for k in range(3)])
        center = means.mean(0)
        direction = F.normalize(means - center, dim=1)
        weight = layer.weight.detach()
        # Every row has the same norm (the scale) and points along its centred class mean.
        norms = weight.norm(dim=1)
        assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4), name
        assert torch.allclose(F.normalize(weight, dim=1), direction, atol=1e-4), name
        centred_norm = (feats - center).norm(dim=1).mean()
        assert float(norms[0] * centred_norm) == pytest.approx(scale, rel=1e-3), name


def test_calibration_sets_the_added_batchnorm_statistics_and_leaves_the_backbones() -> None:
    net = _net("cra-smra")
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    head_bn = net.heads[0].mlp[0]
    momentum = head_bn.momentum
    calibrate_batchnorm(net, lambda: (images for images, _ in _batches()()))
    assert not torch.equal(head_bn.running_mean, torch.zeros_like(head_bn.running_mean))
    assert head_bn.momentum == momentum
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    # The running mean is the average over the whole pass of what the layer normalised
    # (a cumulative average, not an exponential one that would favour the last batch).
    pooled = []
    hook = head_bn.register_forward_pre_hook(lambda _m, a: pooled.append(a[0]))
    net.eval()
    added = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    added = [m for m in added if not any(m is b for b in net.backbone.modules())]
    for m in added:
        m.train()
        m.momentum = 0.0  # normalise with the batch's statistics, update nothing
    with torch.no_grad():
        for images, _ in _batches()():
            net(images)
    hook.remove()
    assert torch.allclose(torch.cat(pooled).mean(0), head_bn.running_mean, atol=1e-4)


def test_imprinted_heads_classify_their_training_data() -> None:
    net = _net("cra-smra")
    report = imprint_classifiers(net, _batches(), num_classes=3)
    assert _training_accuracy(net) >= 0.9
    assert min(report.train_accuracy.values()) >= 0.9
    # Fitted scales: every head's scale is one of the grid's, not the fallback by default.
    assert set(report.logit_scale) == set(net.head_names)


def test_suppression_warmup_schedule() -> None:
    warmup = SuppressionWarmup(omega=0.5, steps=10)
    assert warmup.omega_at(0) == 1.0
    assert warmup.omega_at(5) == pytest.approx(0.75)
    assert warmup.omega_at(10) == 0.5 and warmup.omega_at(100) == 0.5
    assert SuppressionWarmup(0.5, 0).omega_at(0) == 0.5
    net = _net("cra-smra")
    assert warmup.apply(net, 4) == pytest.approx(0.8)
    assert all(m.omega == pytest.approx(0.8) for m in net.attention if isinstance(m, CRAM))


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.first_weight: torch.Tensor | None = None
        self.omegas: list[float] = []
        self.val_omegas: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.first_weight is None:
            self.first_weight = module.net.heads[-1].mlp[-1].weight.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.omegas.append(module.net.attention[0].omega)  # the step's omega

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.val_omegas.append(module.net.attention[0].omega)


def _fit(tmp_path: Path, epochs: int = 1, val: float = 0.0, callbacks: tuple = (),
         **model_kwargs) -> _Recorder:
    L.seed_everything(0)
    dm = FGVCDataModule(**{**TINY_DATA, "val_fraction": val})
    module = build_module(
        backbone="resnet10t", pretrained=False, num_classes=dm.num_classes,
        head_channels=16, head_hidden=16, **model_kwargs,
    )
    recorder = _Recorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[recorder, *callbacks],
    )
    trainer.fit(module, datamodule=dm)
    return recorder


def test_engine_imprints_before_the_first_step(tmp_path: Path) -> None:
    imprinted = _fit(tmp_path, head_init="imprint").first_weight
    rows = imprinted.norm(dim=1)
    assert torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-4)
    random = _fit(tmp_path / "r", head_init="random").first_weight
    rows = random.norm(dim=1)
    assert not torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-2)


def test_engine_warms_the_suppression_up_and_validates_with_the_configured_omega(
    tmp_path: Path,
) -> None:
    recorder = _fit(tmp_path, epochs=2, val=0.25, suppression_warmup_epochs=1.0)
    assert recorder.omegas[0] == 1.0
    assert recorder.omegas[1] == pytest.approx(0.75)  # 2 steps per epoch
    assert recorder.omegas[2:] == [0.5, 0.5]
    assert recorder.val_omegas == [0.5, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"head_init": "zeros"}, "--model.finetune.head_init"),
        ({"imprint_logit_scale": 0.0}, "--model.finetune.imprint_logit_scale"),
        ({"suppression_warmup_epochs": -1.0}, "--model.finetune.suppression_warmup_epochs"),
        ({"head_path_init": "zeros"}, "--model.finetune.head_path_init"),
        ({"head_path_init": "identity"}, "--model.finetune.head_init imprint"),
        (
            {"head_path_init": "identity", "head_init": "imprint", "conv_layer": "pmg"},
            "--model.net.conv_layer light",
        ),
    ],
)
def test_bad_finetune_options_name_their_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        build_module(backbone="resnet10t", num_classes=3, **kwargs)


def test_fit_head_weights_prefers_the_head_that_predicts_held_out_images() -> None:
    from crasmra.finetune import fit_head_weights

    y = torch.tensor([0, 1, 2, 0, 1, 2])
    good = torch.eye(3)[y] * 0.9 + 0.1 / 3
    flat = torch.full((6, 3), 1 / 3)
    wrong = torch.eye(3)[(y + 1) % 3] * 0.9 + 0.1 / 3
    weights = fit_head_weights({"good": good, "flat": flat, "wrong": wrong}, y)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] > 0.99 and weights[2] < weights[1] + 1e-6
    # Two equally good heads share the weight; nothing to fit on gives equal weights.
    assert fit_head_weights({"a": good, "b": good.clone()}, y) == pytest.approx([0.5, 0.5])
    assert fit_head_weights({"a": good, "b": flat}, y[:0]) == [0.5, 0.5]
    assert fit_head_weights({"a": good, "b": flat}, y[:0], fallback=[0, 2]) == [0.0, 1.0]


def test_leave_one_out_logits_leave_the_image_out_of_its_own_class_mean() -> None:
    from crasmra.finetune import leave_one_out_logits

    h = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one image: it has no left-out mean
    counts = torch.bincount(y, minlength=3).float()
    sums = torch.zeros(3, 2).index_add_(0, y, h)
    center = torch.zeros(2)
    logits, kept = leave_one_out_logits(h, y, sums, counts, center)
    assert kept.tolist() == [True, True, True, True, False]
    # Image 0's own class mean without it is image 1 (3, 0): same direction, logit |h| = 1.
    assert float(logits[0, 0]) == pytest.approx(1.0)
    # Its logit for class 1 uses class 1's full mean (0, 3): orthogonal.
    assert float(logits[0, 1]) == pytest.approx(0.0, abs=1e-6)


def test_head_weights_weigh_the_combined_prediction_and_travel_with_the_config() -> None:
    from crasmra.model import CRASMRANet
    from crasmra.outputs import ModelOutput

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out = ModelOutput(stage_logits=(a,), concat_logits=b, features=(), head_weights=(0.25, 0.75))
    expected = 0.25 * a.softmax(-1) + 0.75 * b.softmax(-1)
    assert torch.allclose(out.probs, expected)
    plain_mean = ModelOutput(stage_logits=(a,), concat_logits=b, features=())
    assert torch.allclose(plain_mean.probs, (a.softmax(-1) + b.softmax(-1)) / 2)

    net = _net("cra-smra")
    with pytest.raises(ValueError, match="one weight per head"):
        net.set_head_weights([1.0, 1.0])
    net.set_head_weights([0, 0, 2, 2])
    assert net.head_weights == (0.0, 0.0, 0.5, 0.5)
    assert net.config["head_weights"] == [0.0, 0.0, 0.5, 0.5]
    rebuilt = CRASMRANet(**net.config)
    assert rebuilt.head_weights == net.head_weights
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    output = net(x)
    assert output.head_weights == (0.0, 0.0, 0.5, 0.5)
    expected = (output.logits[2].softmax(-1) + output.logits[3].softmax(-1)) / 2
    assert torch.allclose(output.probs, expected)
    net.reset_classifier(5)
    assert net.head_weights is None and net.config["head_weights"] is None


@pytest.mark.parametrize("bad", [[1.0, -1.0, 1.0, 1.0], [0, 0, 0, 0], [float("nan"), 1, 1, 1]])
def test_bad_head_weights_are_refused(bad: list[float]) -> None:
    from crasmra.model import NetConfig

    with pytest.raises(ValueError, match="head_weights"):
        NetConfig(backbone="resnet10t", num_classes=3, head_weights=bad)


def test_engine_fits_the_combination_at_imprinting_and_checkpoints_it(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    module = build_module(
        backbone="resnet10t", pretrained=False, num_classes=dm.num_classes, head_channels=16,
        head_hidden=16, head_init="imprint", combine="fitted",
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=1,
    )
    trainer.fit(module, datamodule=dm)
    weights = module.net.head_weights
    assert weights is not None and sum(weights) == pytest.approx(1.0)
    assert weights != (0.25,) * 4
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["crasmra"]["net_config"]["head_weights"] == list(weights)
    # A resumed module gets them back from the checkpoint.
    fresh = build_module(backbone="resnet10t", num_classes=dm.num_classes, head_channels=16,
                          head_hidden=16, head_init="imprint", combine="fitted")
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.net.head_weights == weights
    with pytest.raises(ValueError, match=r"--model\.finetune\.head_init imprint"):
        build_module(backbone="resnet10t", num_classes=3, combine="fitted")


def test_imprinting_leaves_the_training_loaders_epochs_alone(tmp_path: Path) -> None:
    """With loader workers, the run trains every epoch it was asked for, numbered from 0."""
    L.seed_everything(0)
    dm = FGVCDataModule(**{**TINY_DATA, "num_workers": 1})
    module = build_module(backbone="resnet10t", num_classes=dm.num_classes, head_channels=8,
                           head_hidden=8, head_init="imprint")
    epochs: list[int] = []

    class Epochs(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            epochs.append(trainer.current_epoch)

    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=2, callbacks=[Epochs()],
    )
    trainer.fit(module, datamodule=dm)
    assert epochs == [0, 1] and trainer.global_step == 4


def test_with_one_image_per_class_the_last_stages_head_decides(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = FGVCDataModule(**{**TINY_DATA, "options": {**TINY_DATA["options"],
                                                    "samples_per_class": 1}})
    module = build_module(backbone="resnet10t", num_classes=dm.num_classes, head_channels=8,
                           head_hidden=8, head_init="imprint", combine="fitted")
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=1,
    )
    trainer.fit(module, datamodule=dm)
    assert module.net.head_weights == (0.0, 0.0, 1.0, 0.0)


def _pooled_inputs(net, images: torch.Tensor) -> list[torch.Tensor]:
    """Each attended stage's Conv_layer input for ``images`` (eval mode)."""
    captured = []
    hooks = [
        a.conv_layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        for a in net.attention
    ]
    with torch.no_grad():
        net.eval()(images)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("variant", ["baseline", "cra-smra"])
def test_init_head_paths_makes_the_projection_keep_the_class_means_and_the_norms_identities(
    variant: str,
) -> None:
    from crasmra.finetune import init_head_paths

    batches = _batches()
    net = _net(variant)
    kept = init_head_paths(net, batches, 3).kept
    images = torch.cat([x for x, _ in batches()])
    labels = torch.cat([y for _, y in batches()])
    inputs = _pooled_inputs(net, images)
    for i, (attention, x) in enumerate(zip(net.attention, inputs, strict=True)):
        conv, norm = attention.conv_layer[0], attention.conv_layer[1]
        w = conv.weight.detach().flatten(1)  # (C_a, C)
        r = kept[f"{net.stage_names[i]} projection"]
        # 3 classes: the centred class means span 2 directions, kept with both signs.
        assert r == 2
        assert torch.allclose(w[:r] @ w[:r].T, torch.eye(r), atol=1e-5)
        assert torch.equal(w[r : 2 * r], -w[:r])
        assert torch.count_nonzero(w[2 * r :]) == 0
        # The directions are those of the class means: the projection of the difference of
        # two class means keeps its whole length.
        pooled = x.mean(dim=(2, 3))
        means = torch.stack([pooled[labels == k].mean(0) for k in range(3)])
        diff = means[0] - means[1]
        assert torch.linalg.norm(w[:r] @ diff) == pytest.approx(float(diff.norm()), rel=1e-3)
        # In eval mode the BatchNorm after the projection is the identity on this data.
        with torch.no_grad():
            projected = conv(x)
            assert torch.allclose(norm(projected), projected, atol=1e-3 * projected.abs().max())
    for head in [*net.heads, net.concat_head]:
        with torch.no_grad():
            p = torch.rand(5, head.mlp[0].num_features) + 0.1
            # first BatchNorm: identity on data like its calibration data, not on any input;
            # its statistics are the pooled features', so check its affine undoes them.
            bn = head.mlp[0]
            assert torch.allclose(bn.weight, (bn.running_var + bn.eps).sqrt(), atol=1e-6)
            assert torch.allclose(bn.bias, bn.running_mean, atol=1e-6)
            assert torch.allclose(bn(p), p, atol=1e-4)
            hidden, bn2 = head.mlp[1], head.mlp[2]
            if hidden.in_features == hidden.out_features:
                assert torch.equal(hidden.weight, torch.eye(hidden.out_features))
            z = hidden(p)
            assert torch.allclose(bn2(z), z, atol=1e-4)


def test_identity_paths_start_the_stage_heads_at_their_stage_maps_nearest_class_mean(
    tmp_path: Path,
) -> None:
    from crasmra.finetune import init_head_paths

    batches = _batches()
    net = _net("baseline")
    init_head_paths(net, batches, 3)
    report = imprint_classifiers(net, batches, 3, calibrate=False)
    images = torch.cat([x for x, _ in batches()])
    labels = torch.cat([y for _, y in batches()])
    # The features before each stage head's classifier: relu([U; -U] x) pooled, unchanged by
    # the BatchNorms and the identity hidden layer (the ELU is the identity on them).
    captured = {}
    hooks = [
        head.mlp[-1].register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0])
        )
        for i, head in enumerate(net.heads)
    ]
    with torch.no_grad():
        net.eval()(images)
    for h in hooks:
        h.remove()
    for i, x in enumerate(_pooled_inputs(net, images)):
        w = net.attention[i].conv_layer[0].weight.detach().flatten(1)
        expected = torch.relu(torch.einsum("oc,bchw->bohw", w, x)).amax(dim=(2, 3))
        assert torch.allclose(captured[i], expected, atol=1e-3 * expected.abs().max())
    assert all(acc == 1.0 for acc in report.train_accuracy.values())
    assert labels.numel() == 12


def test_init_head_paths_refuses_what_it_cannot_initialise() -> None:
    from crasmra.finetune import init_head_paths

    with pytest.raises(ValueError, match="plain variant"):
        init_head_paths(_net("plain"), _batches(), 3)
    torch.manual_seed(0)
    pmg = create_model(
        "resnet10t", 3, variant="baseline", head_channels=16, head_hidden=16, conv_layer="pmg"
    )
    with pytest.raises(ValueError, match=r"--model\.net\.conv_layer light"):
        init_head_paths(pmg, _batches(), 3)


@pytest.mark.parametrize(
    ("path_init", "centred"), [("identity", True), ("identity", False), ("random", True)]
)
def test_engine_initialises_the_head_paths_before_imprinting(
    tmp_path: Path, path_init: str, centred: bool
) -> None:
    seen = []

    class Projection(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if not seen:
                seen.append(module.net.attention[0].conv_layer[0].weight.detach().flatten(1).clone())

    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    module = build_module(
        backbone="resnet10t", pretrained=False, num_classes=dm.num_classes, variant="baseline",
        head_channels=16, head_hidden=16, head_init="imprint", head_path_init=path_init,
        imprint_centered=centred,
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=1, callbacks=[Projection()],
    )
    trainer.fit(module, datamodule=dm)
    w = seen[0]  # (C_a, C)
    # [U; -U; 0] with U the r <= min(K - 1, C_a / 2) centred class-mean directions; with the
    # uncentred imprint, the r <= min(K, C_a / 2) directions of the means themselves.
    r = min(dm.num_classes - (1 if centred else 0), w.shape[0] // 2)
    signed_pairs = torch.equal(w[r : 2 * r], -w[:r]) and torch.count_nonzero(w[2 * r :]) == 0
    assert signed_pairs == (path_init == "identity")


def test_uncentred_imprinting_is_the_plain_cosine_nearest_class_mean() -> None:
    batches = _batches()
    net = _net("plain")
    imprint_classifiers(net, batches, 3, centered=False)
    layer = classifier_layers(net)["classifier"]
    assert torch.count_nonzero(layer.bias) == 0
    centred = _net("plain")
    imprint_classifiers(centred, batches, 3)
    assert torch.count_nonzero(classifier_layers(centred)["classifier"].bias) > 0


def test_plain_ignores_the_head_path_init_of_the_recipe_family(tmp_path: Path) -> None:
    seen = []

    class Classifier(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if not seen:
                layer = classifier_layers(module.net)["classifier"]
                seen.append(layer.weight.detach().clone())

    L.seed_everything(0)
    dm = FGVCDataModule(**TINY_DATA)
    module = build_module(
        backbone="resnet10t", pretrained=False, num_classes=dm.num_classes, variant="plain",
        head_init="imprint", head_path_init="identity", combine="fitted",
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=1, callbacks=[Classifier()],
    )
    trainer.fit(module, datamodule=dm)
    # Imprinted: every class row of timm's classifier has the same norm (the fitted scale).
    rows = seen[0].norm(dim=1)
    assert torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-4)


def _classifier_inputs(net, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each head's classifier input for ``images`` (eval mode), by head name."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        head.mlp[-1].register_forward_pre_hook(
            lambda _m, args, name=name: captured.__setitem__(name, args[0])
        )
        for name, head in zip(net.head_names, [*net.heads, net.concat_head], strict=True)
    ]
    with torch.no_grad():
        net.eval()(images)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("probe", [False, True])
def test_signed_imprinting_starts_each_head_linear_in_its_pairs_differences(probe: bool) -> None:
    """``imprint_signed``: [W, -W, 0] fitted on relu(z) - relu(-z), blind to the pooled |z|."""
    from crasmra.finetune import init_head_paths
    from crasmra.finetune.probe import probe_linear

    batches = _batches()
    net = _net("baseline")
    paths = init_head_paths(net, batches, 3)
    kept, pairs = paths.kept, paths.signed_pairs
    # 3 classes: 2 class-mean directions per stage; the concat head's hidden layer is
    # [U; -U; 0] (48 -> 16), the stage heads' square (the identity).
    assert pairs == {"stage3": 2, "stage4": 2, "stage5": 2, "concat": kept["concat head"]}
    assert pairs["concat"] == 2
    imprint_classifiers(net, batches, 3, calibrate=False, probe=probe, signed_pairs=pairs)
    images = torch.cat([x for x, _ in batches()])
    labels = torch.cat([y for _, y in batches()])
    inputs = _classifier_inputs(net, images)
    for name, layer in classifier_layers(net).items():
        r = pairs[name]
        w = layer.weight.detach()
        assert torch.equal(w[:, r : 2 * r], -w[:, :r]), name
        assert torch.count_nonzero(w[:, 2 * r :]) == 0, name
        h = inputs[name]
        # Adding the same amount to relu(z) and relu(-z) changes |z|, not z: no logit moves.
        shifted = h.clone()
        shifted[:, : 2 * r] += 0.5
        with torch.no_grad():
            logits = layer(h)
            tolerance = 1e-5 * float(logits.abs().max())
            assert torch.allclose(layer(shifted), logits, atol=tolerance), name
        if probe:
            # The classifier is the probe of z = relu(z) - relu(-z) fitted on its own.
            z = h[:, :r] - h[:, r : 2 * r]
            means = torch.stack([z[labels == k].mean(0) for k in range(3)])
            center = means.mean(0)
            reference = nn.Linear(r, 3)
            probe_linear(reference, z, labels, center, float((z - center).norm(dim=1).mean()))
            with torch.no_grad():
                assert torch.allclose(logits, reference(z), atol=tolerance), name


def test_without_signed_imprinting_the_pooled_magnitudes_move_the_logits() -> None:
    """The default keeps every input feature on its own: |z| has weight (the contrast above)."""
    from crasmra.finetune import init_head_paths

    batches = _batches()
    net = _net("baseline")
    init_head_paths(net, batches, 3)
    imprint_classifiers(net, batches, 3, calibrate=False, probe=True)
    images = torch.cat([x for x, _ in batches()])
    h = _classifier_inputs(net, images)["stage5"]
    shifted = h.clone()
    shifted[:, :4] += 0.5
    layer = classifier_layers(net)["stage5"]
    with torch.no_grad():
        assert not torch.allclose(layer(shifted), layer(h), atol=1e-3)


def test_signed_pairs_follow_each_heads_layout() -> None:
    from crasmra.finetune import init_head_paths

    torch.manual_seed(0)
    # Square concat head (3 x 8 -> 24): its input is the stages' pairs side by side, not one
    # block of pairs, so it has none; non-square stage heads (8 -> 6) have their hidden layer's.
    net = create_model("resnet10t", 3, variant="baseline", head_channels=8, head_hidden=24)
    paths = init_head_paths(net, _batches(), 3)
    assert paths.signed_pairs["concat"] == 0
    assert paths.kept["stage5 head"] == 2
    assert paths.signed_pairs["stage5"] == 2
    assert set(paths.signed_pairs) == set(net.head_names)


def test_imprint_signed_needs_identity_head_paths() -> None:
    with pytest.raises(ValueError, match=r"--model\.finetune\.head_path_init identity"):
        build_module(backbone="resnet10t", num_classes=3, head_init="probe",
                     imprint_signed=True)
    with pytest.raises(ValueError, match=r"--model\.finetune\.imprint_signed"):
        build_module(backbone="resnet10t", num_classes=3, head_init="probe",
                     head_path_init="identity", imprint_signed="yes")


# ---------------------------------------------------------------------------------------------
# --model.finetune.head_path_directions principal
# ---------------------------------------------------------------------------------------------
def test_principal_directions_add_the_leading_variance_outside_the_class_means() -> None:
    from crasmra.finetune import init_head_paths

    batches = _batches(per_class=8)
    means_only = _net("baseline")
    kept_means = init_head_paths(means_only, batches, 3).kept
    net = _net("baseline")
    paths = init_head_paths(net, batches, 3, directions="principal")
    images = torch.cat([x for x, _ in batches()])
    for i, x in enumerate(_pooled_inputs(net, images)):
        stage = net.stage_names[i]
        r_means = kept_means[f"{stage} projection"]
        r = paths.kept[f"{stage} projection"]
        conv = net.attention[i].conv_layer[0]
        w = conv.weight.detach().flatten(1)  # (C_a, C)
        # Up to half the projection's width, and no more than the pooled features' rank.
        pooled = x.mean(dim=(2, 3)).double()  # (N, C)
        rank = int(torch.linalg.matrix_rank(pooled - pooled.mean(0)))
        assert r == min(conv.out_channels // 2, rank) > r_means == 2
        assert paths.signed_pairs[stage] == r
        # The class means' directions come first, as without the switch; then orthonormal
        # directions outside their span, still as +/- pairs.
        reference = means_only.attention[i].conv_layer[0].weight.detach().flatten(1)
        torch.testing.assert_close(w[:r_means], reference[:r_means])
        assert torch.allclose(w[:r] @ w[:r].T, torch.eye(r), atol=1e-5)
        assert torch.equal(w[r : 2 * r], -w[:r])
        assert torch.count_nonzero(w[2 * r :]) == 0
        # The added directions are the leading eigenvectors of the covariance left outside
        # the class means' span: their variance is the top eigenvalues of that covariance.
        u = w[:r_means].double()
        outside = torch.eye(u.shape[1], dtype=torch.float64) - u.T @ u
        centred = (pooled - pooled.mean(0)) @ outside
        covariance = centred.T @ centred / len(pooled)
        top = torch.linalg.eigvalsh(covariance).flip(0)[: r - r_means]
        extra = w[r_means:r].double()
        captured = ((extra @ covariance) * extra).sum(dim=1)
        torch.testing.assert_close(captured, top, rtol=1e-3, atol=1e-6 * float(top[0]))


def test_head_path_directions_is_checked() -> None:
    from crasmra.finetune import init_head_paths

    with pytest.raises(ValueError, match="directions must be one of"):
        init_head_paths(_net("baseline"), _batches(), 3, directions="pca")
    with pytest.raises(ValueError, match=r"--model\.finetune\.head_path_init identity"):
        build_module(backbone="resnet10t", num_classes=3, head_init="probe",
                     head_path_directions="principal")
    with pytest.raises(ValueError, match=r"--model\.finetune\.head_path_directions"):
        build_module(backbone="resnet10t", num_classes=3, head_init="probe",
                     head_path_init="identity", head_path_directions="pca")


def test_uncentred_head_paths_start_the_stage_heads_at_the_uncentred_nearest_class_mean() -> None:
    from crasmra.finetune import init_head_paths

    batches = _batches()
    torch.manual_seed(0)
    net = create_model("resnet10t", 3, variant="baseline", head_channels=16, head_hidden=16,
                       head_pool="avg")
    paths = init_head_paths(net, batches, 3, centred=False)
    imprint_classifiers(net, batches, 3, calibrate=False, centered=False,
                        signed_pairs=paths.signed_pairs)
    images = torch.cat([x for x, _ in batches()])
    labels = torch.cat([y for _, y in batches()])
    train_inputs = _pooled_inputs(net, images)
    # New images, away from the training ones: the heads must agree with the nearest class
    # mean everywhere, not only where both are right.
    g = torch.Generator().manual_seed(7)
    probes = torch.randn(40, 3, 32, 32, generator=g) * 1.5 + torch.rand(40, 1, 1, 1, generator=g)
    probe_inputs = _pooled_inputs(net, probes)
    with torch.no_grad():
        logits = net.eval()(probes).logits
    agreed = 0
    for i, stage in enumerate(net.stage_names):
        # 3 classes: the means themselves span 3 directions (2 once centred).
        assert paths.kept[f"{stage} projection"] == 3
        w = net.attention[i].conv_layer[0].weight.detach().flatten(1)[:3]  # (3, C)
        pooled = train_inputs[i].mean(dim=(2, 3)).double()
        means = torch.stack([pooled[labels == k].mean(0) for k in range(3)])  # (3, C)
        # Every class mean lies in the kept span: its projection keeps its whole length.
        assert torch.allclose(torch.linalg.norm(means @ w.double().T, dim=1),
                              torch.linalg.norm(means, dim=1), rtol=1e-3)
        x = probe_inputs[i].mean(dim=(2, 3)).double()
        ncm = (F.normalize(x, dim=1) @ F.normalize(means, dim=1).T).argmax(dim=1)
        assert torch.equal(logits[i].argmax(dim=1), ncm)
        agreed += int((ncm != ncm[0]).any())
    assert agreed > 0  # the nearest class mean does not give every probe one class


@pytest.mark.parametrize(("centred", "directions"), [(True, 2), (False, 3)])
def test_centred_head_paths_keep_one_direction_fewer(centred: bool, directions: int) -> None:
    from crasmra.finetune import init_head_paths

    kept = init_head_paths(_net("baseline"), _batches(), 3, centred=centred).kept
    stages = _net("baseline").stage_names
    assert all(kept[f"{stage} projection"] == directions for stage in stages)
    # A non-square hidden layer keeps a span of its own input's class means: the same count.
    torch.manual_seed(0)
    narrow = create_model("resnet10t", 3, variant="baseline", head_channels=16, head_hidden=8)
    kept = init_head_paths(narrow, _batches(), 3, centred=centred).kept
    assert all(kept[f"{stage} head"] == directions for stage in stages)
