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
from test_imprint import _batches, _fit, _net, _training_accuracy


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


def _directional_classes(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by their direction from a centre; each feature's norm varies
    tenfold and says nothing of its class."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.eye(3)
    y = torch.arange(3).repeat_interleave(per_class)
    radius = 1.0 + 9.0 * torch.rand(3 * per_class, 1, generator=g)
    x = radius * (directions[y] + 0.3 * torch.randn(3 * per_class, 3, generator=g))
    return x + torch.tensor([5.0, -2.0, 1.0]), y


def test_probe_linear_makes_the_layer_compute_the_probes_logits_scaled_by_the_norm() -> None:
    x, y = _directional_classes(30)
    layer = nn.Linear(3, 3)
    center, norm = torch.tensor([5.0, -2.0, 1.0]), 4.0
    probe, choice = probe_linear(layer, x, y, center, norm)
    centred = (x - center).double()
    unit = torch.nn.functional.normalize(centred, dim=1)  # (N, D)
    # A bias-free probe of directions: the layer's logits are its logits times |h - c| / norm.
    assert torch.count_nonzero(probe.bias) == 0
    expected = probe.logits(unit) * (centred.norm(dim=1, keepdim=True) / norm)
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)
    assert torch.equal(layer(x).argmax(dim=1), probe.logits(unit).argmax(dim=1))
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
    assert _training_accuracy(probed_net) >= 0.9


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
