"""``--model.finetune.head_init probe``: every classifier starts as the logistic regression of
its own input features (linear probing before fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import build_module
from crasmra.finetune import imprint_classifiers
from crasmra.finetune.probe import fit_logreg, probe_linear, select_decay
from test_imprint import _batches, _fit, _net


def _stretched_classes(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes whose means differ along a direction of small spread while a direction of
    large, class-independent spread dominates the norm: the centred cosine nearest class mean
    is near chance there, a logistic regression is not."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * per_class
    y = torch.arange(2).repeat_interleave(per_class)
    x = torch.zeros(n, 2)
    x[:, 0] = 10.0 * torch.randn(n, generator=g)  # large spread, no class information
    x[:, 1] = (2.0 * y.float() - 1.0) * 0.5 + 0.1 * torch.randn(n, generator=g)
    return x + torch.tensor([3.0, 1.0]), y


def test_probe_linear_makes_the_layer_compute_the_probes_logits() -> None:
    x, y = _stretched_classes(40)
    layer = nn.Linear(2, 2)
    center, norm = x.mean(dim=0), 7.0
    probe, choice = probe_linear(layer, x, y, center, norm)
    expected = probe.logits((x - center) / norm)  # (N, K) on the centred, scaled features
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)
    # It separates what the nearest class mean cannot.
    assert probe.accuracy((x - center) / norm, y) >= 0.95
    assert float((layer(x).argmax(dim=1) == y).float().mean()) >= 0.95
    assert choice.selection == "holdout"


def test_probe_linear_refuses_what_it_cannot_fit() -> None:
    x, y = _stretched_classes(4)
    with pytest.raises(ValueError, match="norm"):
        probe_linear(nn.Linear(2, 2), x, y, x.mean(0), 0.0)
    with pytest.raises(ValueError, match="head_init imprint"):
        probe_linear(nn.Linear(2, 2, bias=False), x, y, x.mean(0), 1.0)


def test_the_decay_is_chosen_on_a_hold_out_unless_a_class_has_one_photo() -> None:
    x, y = _stretched_classes(20)
    held = select_decay(x, y, 2, (1e-4, 10.0), normalize=False)
    # A decay of 10 shrinks the weights to nearly nothing: the hold-out must reject it.
    assert held.selection == "holdout" and held.decay == 1e-4
    assert held.holdout_images > 0
    single = select_decay(x[[0, -1]], y[[0, -1]], 2, (1e-4, 10.0), normalize=False)
    assert single.selection == "fixed" and "single training photo" in single.reason


def test_fit_logreg_without_normalising_is_linear_in_the_features() -> None:
    x, y = _stretched_classes(20)
    probe = fit_logreg(x, y, 2, 1e-3, normalize=False)
    assert not probe.normalize
    assert torch.allclose(probe.logits(2 * x) - probe.bias, 2 * (probe.logits(x) - probe.bias))
    normalised = fit_logreg(x, y, 2, 1e-3)
    assert torch.allclose(normalised.logits(2 * x), normalised.logits(x))


@pytest.mark.parametrize("variant", ["cra-smra", "plain"])
def test_probe_init_refits_every_classifier_and_keeps_the_imprinted_combination(
    variant: str,
) -> None:
    imprinted_net, probed_net = _net(variant), _net(variant)
    imprinted = imprint_classifiers(imprinted_net, _batches(), num_classes=3)
    probed = imprint_classifiers(probed_net, _batches(), num_classes=3, probe=True)
    assert set(probed.probe_decay) == set(probed_net.head_names)
    assert set(probed.probe_selection.values()) == {"holdout"}
    assert not imprinted.probe_decay
    # The combination weights are fitted to the imprinted classifiers' leave-one-out
    # predictions: the same with or without the probe.
    for name in imprinted.loo_probs:
        assert torch.allclose(imprinted.loo_probs[name], probed.loo_probs[name])
    changed = [
        not torch.allclose(a.weight, b.weight)
        for a, b in zip(imprinted_net.classifier_layers().values(),
                        probed_net.classifier_layers().values(), strict=True)
    ]
    assert all(changed)
    # The probed network classifies its training images.
    probed_net.eval()
    correct = total = 0
    with torch.no_grad():
        for images, target in _batches()():
            correct += int((probed_net(images).probs.argmax(1) == target).sum())
            total += len(target)
    assert correct / total >= 0.9


def test_engine_fits_the_probe_before_the_first_step(tmp_path: Path) -> None:
    probed = _fit(tmp_path, head_init="probe").first_weight
    imprinted = _fit(tmp_path / "i", head_init="imprint").first_weight
    assert not torch.allclose(probed, imprinted)
    # Imprinted rows all have one norm; a logistic regression's do not.
    rows = probed.norm(dim=1)
    assert not torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs", [{"head_path_init": "identity"}, {"combine": "fitted"}],
)
def test_probe_init_is_an_imprinting_init_for_the_other_switches(kwargs: dict) -> None:
    module = build_module(backbone="resnet10t", num_classes=3, head_init="probe", **kwargs)
    assert module.finetune.imprints


# ---------------------------------------------------------------- keep_probe_decay


def test_the_probe_is_a_stationary_point_of_the_training_objective_with_the_carried_decay(
) -> None:
    # carry_probe_decay's conversion: on the layer's own weights the probe's objective is
    # CE + decay * norm**2 / 2 * ||W||^2, so its fitted weights have (nearly) zero gradient.
    x, y = _stretched_classes(30)
    layer = nn.Linear(2, 2).double()
    center, norm, decay = x.mean(dim=0).double(), 7.0, 1e-2
    probe_linear(layer, x.double(), y, center, norm, decays=(decay,))

    def gradient(layer_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        layer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x.double()), y)
        (loss + 0.5 * layer_decay * layer.weight.pow(2).sum()).backward()
        return layer.weight.grad.abs().max(), layer.bias.grad.abs().max()

    weight_grad, bias_grad = gradient(decay * norm**2)
    assert weight_grad < 1e-4 and bias_grad < 1e-4
    # The decay unscaled, or scaled by the norm once, is another objective.
    assert gradient(decay)[0] > 1e-2 and gradient(decay * norm)[0] > 1e-2


def test_split_classifiers_gives_each_classifier_weight_a_group_of_its_own() -> None:
    from crasmra.engine.parts import OptimConfig
    from crasmra.engine.schedule import CLASSIFIER_GROUP, parameter_groups

    for variant in ("cra-smra", "plain"):
        net = _net(variant)
        optim = OptimConfig()
        plain_groups = parameter_groups(net, None, optim)
        split = parameter_groups(net, None, optim, split_classifiers=True)
        everything = [id(p) for g in plain_groups for p in g["params"]]
        assert sorted(id(p) for g in split for p in g["params"]) == sorted(everything)
        own = {g["name"]: g for g in split if g["name"].startswith(CLASSIFIER_GROUP)}
        assert set(own) == {CLASSIFIER_GROUP + h for h in net.head_names}
        for head, layer in net.classifier_layers().items():
            group = own[CLASSIFIER_GROUP + head]
            assert group["params"] == [layer.weight] and group["lr"] == optim.lr_heads
        heads = next(g for g in split if g["name"] == "heads")
        first_bias = next(iter(net.classifier_layers().values())).bias
        assert any(p is first_bias for p in heads["params"])


def test_carry_probe_decay_weighs_each_head_by_its_loss_weight() -> None:
    from crasmra.engine.parts import OptimConfig
    from crasmra.engine.probe_decay import carry_probe_decay, head_loss_weights
    from crasmra.engine.schedule import parameter_groups
    from crasmra.finetune import ImprintReport
    from crasmra.losses import LossWeights

    net = _net("cra-smra")
    loss = LossWeights(alpha=2.0, beta=0.5)
    assert head_loss_weights(net, loss) == {**dict.fromkeys(net.stage_names, 2.0),
                                            "concat": 0.5}
    assert head_loss_weights(_net("plain"), loss) == {"classifier": 1.0}
    optimizer = torch.optim.SGD(
        parameter_groups(net, None, OptimConfig(), split_classifiers=True), lr=0.1,
        weight_decay=1e-5)
    last, concat = net.stage_names[-1], "concat"
    report = ImprintReport({}, {}, probe_decay={last: 1e-3, concat: 1e-2},
                           probe_selection={last: "fixed", concat: "holdout"},
                           probe_norm={last: 10.0, concat: 4.0})
    applied = carry_probe_decay(optimizer, net, report, loss)
    assert applied == pytest.approx({last: 2.0 * 1e-3 * 100.0, concat: 0.5 * 1e-2 * 16.0})
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay[f"classifier/{last}"] == pytest.approx(0.2)
    assert decay[f"classifier/{net.stage_names[0]}"] == 1e-5  # no probe: unchanged
    assert decay["heads"] == 1e-5


def test_engine_carries_the_probe_decay_into_the_optimiser(tmp_path: Path) -> None:
    import lightning as L

    seen: dict[str, float] = {}

    class _Decays(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if not seen:
                seen.update({g["name"]: g["weight_decay"]
                             for g in trainer.optimizers[0].param_groups})

    _fit(tmp_path, head_init="probe", keep_probe_decay=True, callbacks=(_Decays(),))
    carried = {k: v for k, v in seen.items() if k.startswith("classifier/")}
    assert len(carried) == 4 and all(v > 1e-5 for v in carried.values())
    with pytest.raises(ValueError, match=r"--model\.finetune\.head_init probe"):
        build_module(backbone="resnet10t", num_classes=3, keep_probe_decay=True)
