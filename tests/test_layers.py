"""CRAM, its stand-ins, SMRAM, diversity_loss and the heads, on small random tensors."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers.cbam import CbamModule
from torch import nn

from crasmra.layers import (
    CRAM,
    SMRAM,
    CBAMAttention,
    ClassifierHead,
    IdentityAttention,
    build_conv_layer,
    diversity_loss,
    record_channel_importance,
    suppression_mask,
    top_k_suppression_mask,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- suppression_mask -------------------------------------------------------------------------


def _expected_mask(importance: torch.Tensor, omega: float, delta: float) -> torch.Tensor:
    # softmax(I)_k / max_j softmax(I)_j = exp(I_k - max I), so the rule is I_k >= max I + ln(delta).
    top = importance.max(dim=1, keepdim=True).values
    chosen = importance >= top + math.log(delta)
    return torch.where(chosen, torch.tensor(omega), torch.tensor(1.0))


@pytest.mark.parametrize(("omega", "delta"), [(0.5, 0.9), (0.2, 0.95), (0.0, 1.0), (0.75, 0.5)])
def test_mask_picks_channels_within_delta_of_max(omega: float, delta: float) -> None:
    importance = torch.rand(4, 64)
    mask = suppression_mask(importance, omega, delta)
    assert mask.shape == importance.shape
    expected = _expected_mask(importance, omega, delta)
    # every sample has suppressed and kept channels, so both branches of the rule are checked
    assert ((expected == omega).any(dim=1) & (expected == 1.0).any(dim=1)).all()
    torch.testing.assert_close(mask, expected)


def test_mask_hand_example_is_per_sample() -> None:
    # exp(-0.05) = 0.951 >= 0.9 (suppressed); exp(-0.2) = 0.819 < 0.9 (kept).
    importance = torch.tensor([[0.90, 0.85, 0.70, 0.10], [0.10, 0.20, 0.30, 0.99]])
    mask = suppression_mask(importance, omega=0.5, delta=0.9)
    expected = torch.tensor([[0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5]])
    torch.testing.assert_close(mask, expected)


def test_mask_has_no_gradient() -> None:
    importance = torch.rand(2, 8, requires_grad=True)
    mask = suppression_mask(importance)
    assert not mask.requires_grad
    assert mask.grad_fn is None


# ---- CRAM -------------------------------------------------------------------------------------


def test_cram_outputs_and_definitions() -> None:
    cram = CRAM(32, 16, reduction=4).eval()
    x = torch.randn(2, 32, 6, 5)
    with record_channel_importance([cram]) as recorded:
        x_e, x_s = cram(x)
    assert x_e.shape == (2, 16, 6, 5)
    assert x_s.shape == x.shape
    # I = sigmoid(MLP(avg) + MLP(max)) with the shared MLP, written out with its weights
    w1, w2 = cram.mlp[0].weight.flatten(1), cram.mlp[2].weight.flatten(1)
    pooled = (x.mean(dim=(2, 3)), x.amax(dim=(2, 3)))
    importance = torch.sigmoid(sum(torch.relu(z @ w1.T) @ w2.T for z in pooled))
    assert recorded[0] is not None and not recorded[0].requires_grad
    torch.testing.assert_close(recorded[0], importance)
    # Outside the block the hooks are gone: nothing is recorded, nothing kept on the module.
    cram(x)
    assert not cram.gate._forward_hooks
    mask = _expected_mask(importance, cram.omega, cram.delta)
    torch.testing.assert_close(x_s, x * mask[:, :, None, None])
    torch.testing.assert_close(x_e, cram.conv_layer(importance[:, :, None, None] * x))
    # the most important channel is damped by omega; channels below the threshold pass as they are
    rows, top = torch.arange(2), importance.argmax(dim=1)
    torch.testing.assert_close(x_s[rows, top], cram.omega * x[rows, top])
    kept = mask == 1.0
    assert kept.any()
    torch.testing.assert_close(x_s[kept], x[kept], rtol=0, atol=0)


def test_cram_gradient_reaches_input_through_x_s_but_not_through_mask() -> None:
    cram = CRAM(16, 8, reduction=4)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    with record_channel_importance([cram]) as recorded:
        _, x_s = cram(x)
    x_s.sum().backward()
    mask = suppression_mask(recorded[0], cram.omega, cram.delta)
    # d(sum(S * X))/dX = S exactly: nothing flows back through S into the importance MLP
    torch.testing.assert_close(x.grad, mask[:, :, None, None].expand_as(x))
    assert all(p.grad is None for p in cram.mlp.parameters())


def test_cram_gradient_reaches_input_and_mlp_through_x_e() -> None:
    cram = CRAM(16, 8, reduction=4)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    x_e, _ = cram(x)
    x_e.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in cram.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_top_k_mask_damps_exactly_the_k_largest_logits() -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5], [4.0, -2.0, 3.0, 0.0]])
    mask = top_k_suppression_mask(logits, omega=0.25, top_k=2)
    assert torch.equal(mask, torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 1.0, 0.25, 1.0]]))
    # More than C: every channel.
    assert torch.equal(top_k_suppression_mask(logits, 0.5, 9), torch.full((2, 4), 0.5))


def test_top_k_mask_resolves_the_ties_the_float32_threshold_makes() -> None:
    # Logits as a trained stage-4 CRAM gives them: every channel above ~17 has I == 1.0 in
    # float32, so the delta-1 threshold damps all of them; exact arithmetic damps one. An
    # importance MLP with no active hidden unit gives every channel the logit 0.
    saturated = torch.tensor([[170.9, 156.9, 88.4, 68.9, 3.0, -1.0]])
    dead = torch.zeros(1, 6)
    for logits in (saturated, dead):
        assert (suppression_mask(torch.sigmoid(logits), 0.5, 1.0) < 1).sum() > 1
        mask = top_k_suppression_mask(logits, 0.5, 1)
        assert (mask == 0.5).sum() == 1 and (mask == 1).sum() == 5
    assert top_k_suppression_mask(saturated, 0.5, 1)[0, 0] == 0.5


def test_top_k_mask_has_no_gradient_and_keeps_the_dtype() -> None:
    logits = torch.randn(3, 8, requires_grad=True)
    mask = top_k_suppression_mask(logits, 0.5, 1)
    assert not mask.requires_grad
    assert top_k_suppression_mask(logits.detach().bfloat16(), 0.5, 1).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="logits must be"):
        top_k_suppression_mask(torch.randn(2, 3, 1, 1), 0.5, 1)


def test_cram_suppress_top_k_uses_the_logits_top_channel() -> None:
    cram = CRAM(16, 8, reduction=4, omega=0.5, delta=0.9, suppress_top_k=1).eval()
    assert CRAM(16, 8).suppress_top_k is None  # the paper's threshold by default
    # Logits far above the sigmoid's float32 range: I is 1.0 for most channels.
    with torch.no_grad():
        cram.mlp[2].weight.mul_(1e4)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        x_e, x_s = cram(x)
        logits = cram.channel_logits(x).flatten(1)
    top = logits.argmax(dim=1)
    expected = torch.ones(2, 16)
    expected[torch.arange(2), top] = 0.5
    torch.testing.assert_close(x_s, x * expected[:, :, None, None])
    assert (cram.channel_importance(x).flatten(1) == 1.0).sum(1).min() > 1
    # x_e is the paper's: Conv_layer(I * X), whichever mask.
    torch.testing.assert_close(x_e, cram.conv_layer(cram.channel_importance(x) * x))
    assert "suppress_top_k=1" in repr(cram)


@pytest.mark.parametrize("top_k", [0, -1, 1.5, True, "1"])
def test_cram_rejects_a_bad_suppress_top_k(top_k: object) -> None:
    with pytest.raises(ValueError, match="suppress_top_k must be null"):
        CRAM(16, 8, suppress_top_k=top_k)  # type: ignore[arg-type]


def test_suppress_source_selects_the_formula_of_x_s() -> None:
    x = torch.randn(2, 16, 3, 4)
    cram_input = CRAM(16, 8, reduction=4).eval()
    cram_enhanced = CRAM(16, 8, reduction=4, suppress_source="enhanced").eval()
    cram_enhanced.load_state_dict(cram_input.state_dict())
    assert cram_input.suppress_source == "input"  # the default
    with record_channel_importance([cram_input]) as recorded:
        x_e_in, x_s_in = cram_input(x)
    x_e_en, x_s_en = cram_enhanced(x)
    importance = recorded[0][:, :, None, None]
    mask = suppression_mask(recorded[0], 0.5, 0.9)[:, :, None, None]
    torch.testing.assert_close(x_s_in, mask * x)  # X_s = S (x) X
    torch.testing.assert_close(x_s_en, mask * (importance * x))  # X_s = S (x) (I (x) X)
    torch.testing.assert_close(x_e_en, x_e_in)  # the head side does not change
    assert "suppress_source='enhanced'" in repr(cram_enhanced)


@pytest.mark.parametrize(("source", "mlp_learns"), [("input", False), ("enhanced", True)])
def test_only_enhanced_suppression_trains_the_mlp_through_x_s(
    source: str, mlp_learns: bool
) -> None:
    cram = CRAM(16, 8, reduction=4, suppress_source=source)
    _, x_s = cram(torch.randn(2, 16, 4, 4, requires_grad=True))
    x_s.square().sum().backward()  # a loss on x_s alone, as the later stages give
    for p in cram.mlp.parameters():
        if mlp_learns:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None
    assert all(p.grad is None for p in cram.conv_layer.parameters())


def test_cram_rejects_an_unknown_suppress_source() -> None:
    with pytest.raises(ValueError, match=r"suppress_source.*'input'.*'enhanced'"):
        CRAM(16, 8, suppress_source="mask")  # type: ignore[arg-type]


def test_cram_hyperparameters_reach_submodules() -> None:
    cram = CRAM(64, 32, reduction=8, omega=0.3, delta=0.7, conv_layer="pmg")
    assert (cram.omega, cram.delta, cram.reduction) == (0.3, 0.7, 8)
    assert cram.mlp[0].out_channels == 64 // 8
    assert cram.mlp[2].out_channels == 64
    convs = [m for m in cram.conv_layer.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (64, 16, (1, 1)),
        (16, 32, (3, 3)),
    ]
    light = [m for m in CRAM(64, 32).conv_layer.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in light] == [(32, (1, 1))]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [(dict(omega=1.5), "omega"), (dict(omega=-0.1), "omega"), (dict(omega=True), "omega"),
     (dict(omega=float("nan")), "omega"), (dict(delta=0.0), "delta"), (dict(delta=1.1), "delta"),
     (dict(delta="0.9"), "delta"), (dict(reduction=0), "reduction")],
)
def test_cram_rejects_bad_hyperparameters(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} must be"):
        CRAM(16, 8, **kwargs)


def test_build_conv_layer_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="light"):
        build_conv_layer("heavy", 8, 8)


def test_identity_and_cbam_follow_the_contract() -> None:
    x = torch.randn(2, 16, 5, 7)
    ident = IdentityAttention(16, 8).eval()
    x_e, x_s = ident(x)
    assert x_s is x and x_e.shape == (2, 8, 5, 7)

    cbam = CBAMAttention(16, 8, reduction=4).eval()
    assert isinstance(cbam.cbam, CbamModule)
    assert cbam.cbam.channel.fc1.out_channels == 4
    x_e, x_s = cbam(x)
    refined = cbam.cbam(x)
    torch.testing.assert_close(x_s, refined)
    torch.testing.assert_close(x_e, cbam.conv_layer(refined))


# ---- diversity_loss and SMRAM -----------------------------------------------------------------


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_diversity_loss_bounds(stages: int) -> None:
    uniform = torch.full((3, 1, 4, 5), 1 / 20).expand(3, stages, 4, 5)
    torch.testing.assert_close(diversity_loss(uniform), torch.tensor(1 - 1 / stages))
    disjoint = torch.zeros(3, stages, 4, 5)
    for s in range(stages):
        disjoint[:, s].view(3, -1)[:, s] = 1.0  # one-hot at a different position per stage
    torch.testing.assert_close(diversity_loss(disjoint), torch.tensor(0.0))
    # the "-h" form differs by the constant 1
    torch.testing.assert_close(diversity_loss(uniform, form="-h"), torch.tensor(-1 / stages))


def test_smram_maps_are_distributions_for_mixed_nonsquare_sizes() -> None:
    smram = SMRAM(8, num_stages=3)
    # smallest height comes from one map, smallest width from another
    features = [torch.randn(2, 8, 10, 12), torch.randn(2, 8, 5, 7), torch.randn(2, 8, 6, 3)]
    for f in features:
        f.requires_grad_(True)
    loss, attention = smram(features)
    assert attention.shape == (2, 3, 5, 3)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(2, 3))
    assert 0.0 <= loss.item() <= 1 - 1 / 3 + 1e-6
    loss.backward()
    for p in smram.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_smram_rejects_wrong_number_of_maps() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        SMRAM(4)([torch.randn(1, 4, 2, 2)] * 2)


# ---- heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_classifier_head_pools_and_classifies(pool: str) -> None:
    head = ClassifierHead(8, 5, hidden=16, pool=pool).eval()
    x = torch.randn(3, 8, 4, 6)
    pooled = head.pool_features(x)
    reference = x.amax(dim=(2, 3)) if pool == "max" else x.mean(dim=(2, 3))
    torch.testing.assert_close(pooled, reference)
    torch.testing.assert_close(head(x), head.classify(pooled))
    assert head(x).shape == (3, 5)
    layers = [type(m).__name__ for m in head.mlp]
    assert layers == ["BatchNorm1d", "Linear", "BatchNorm1d", "ELU", "Linear"]
    assert head.mlp[1].out_features == 16


def test_classifier_head_rejects_unknown_pool() -> None:
    with pytest.raises(ValueError, match="max"):
        ClassifierHead(8, 5, pool="median")
