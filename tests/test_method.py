"""The method's equations, each checked against an independent computation on small tensors.

Every reference below is written with plain torch operations from SPEC.md, reading only the
parameters of the module under test (MLP, conv, BN and phi weights), never its methods.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from conftest import build_module
from crasmra.engine import CRASMRAModule, OptimConfig, WarmupCosine, build_scheduler
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
)
from crasmra.losses import CRASMRALoss
from crasmra.model import CRASMRANet, ModelOutput, create_model, create_smram, validate_hparams

TINY_NET = dict(head_channels=16, head_hidden=8)
TINY_MODULE = dict(backbone="resnet10t", num_classes=4, pretrained=False, **TINY_NET)
#: One CNN and Transformers at the smallest size their stages allow: (backbone, image size).
#: Swin hands CRAM channels-last maps turned to (B, C, H, W); a ViT its patch tokens as a map.
CNN_AND_TRANSFORMERS = [
    ("resnet10t", 64),
    ("swin_tiny_patch4_window7_224", 64),
    ("vit_tiny_patch16_224", 32),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- references --------------------------------------------------------------------------------


def ref_importance(cram: CRAM, x: Tensor) -> Tensor:
    """I = sigmoid(MLP(avgpool X) + MLP(maxpool X)), MLP(z) = W2 relu(W1 z), shared; (B, C)."""
    w1 = cram.mlp[0].weight.flatten(1)  # (C/r, C)
    w2 = cram.mlp[2].weight.flatten(1)  # (C, C/r)

    def mlp(z: Tensor) -> Tensor:
        return torch.relu(z @ w1.T) @ w2.T

    flat = x.flatten(2)
    return torch.sigmoid(mlp(flat.mean(dim=2)) + mlp(flat.max(dim=2).values))


def ref_mask(importance: Tensor, omega: float, delta: float) -> Tensor:
    """S_k = omega where softmax(I)_k >= delta * max_j softmax(I)_j, else 1; (B, C)."""
    probs = torch.exp(importance) / torch.exp(importance).sum(dim=1, keepdim=True)
    chosen = probs >= delta * probs.max(dim=1, keepdim=True).values
    return torch.where(chosen, torch.tensor(omega), torch.tensor(1.0))


def ref_conv_bn_relu(block: nn.Sequential, x: Tensor) -> Tensor:
    """1x1 conv (no bias), BatchNorm with running statistics, ReLU."""
    conv, bn = block[0], block[1]
    y = torch.einsum("oc,bchw->bohw", conv.weight.flatten(1), x)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    y = (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return torch.relu(y)


def ref_block_mean(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Average pooling of (B, C, H, W) to ``size`` when H, W are multiples of it."""
    b, c, h, w = x.shape
    fh, fw = h // size[0], w // size[1]
    return x.reshape(b, c, size[0], fh, size[1], fw).mean(dim=(3, 5))


def ref_smram(smram: SMRAM, features: list[Tensor]) -> tuple[Tensor, Tensor]:
    """SMRAM in training mode: avg-pool to the smallest map, BN on batch statistics, phi,
    softmax over positions; L_div = 1 - mean_b (1/eps) sum_j max_s A[b, s, j]."""
    size = (min(f.shape[2] for f in features), min(f.shape[3] for f in features))
    maps = []
    for f, phi in zip(features, smram.phi, strict=True):
        pooled = ref_block_mean(f, size)
        mean = pooled.mean(dim=(0, 2, 3), keepdim=True)
        var = pooled.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        normed = (pooled - mean) / torch.sqrt(var + 1e-5)
        logits = torch.einsum("c,bchw->bhw", phi.weight.flatten(), normed).flatten(1)
        maps.append(torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True))
    attention = torch.stack(maps, dim=1)  # (B, eps, H_L * W_L)
    eps = attention.shape[1]
    h = attention.max(dim=1).values.sum(dim=1) / eps
    return 1.0 - h.mean(), attention.reshape(*attention.shape[:2], *size)


def ref_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_probs[torch.arange(len(target)), target].mean()


def ref_probs(output: ModelOutput) -> Tensor:
    """The test-time prediction: (p_3 + p_4 + p_5 + p_concat) / 4."""
    heads = [*output.stage_logits, output.concat_logits]
    return sum(torch.exp(lg) / torch.exp(lg).sum(dim=1, keepdim=True) for lg in heads) / 4


def _randomise_batchnorms(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)


# ---- CRAM --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("omega", "delta"), [(0.5, 0.9), (0.25, 0.97)])
def test_cram_matches_the_equations(omega: float, delta: float) -> None:
    """I from the shared MLP on both poolings, S from softmax(I), X_e = Conv(I X), X_s = S X."""
    cram = CRAM(32, 12, reduction=4, omega=omega, delta=delta)
    _randomise_batchnorms(cram)
    cram.eval()
    x = torch.randn(3, 32, 5, 4) + torch.linspace(-1, 1, 32)[None, :, None, None]
    with torch.no_grad(), record_channel_importance([cram]) as recorded:
        x_e, x_s = cram(x)
        importance = ref_importance(cram, x)
        expected_e = ref_conv_bn_relu(cram.conv_layer, importance[:, :, None, None] * x)
    mask = ref_mask(importance, omega, delta)
    # the inputs exercise both kinds of channel, in every sample
    assert ((mask == omega).any(dim=1) & (mask == 1.0).any(dim=1)).all()
    torch.testing.assert_close(recorded[0], importance)
    torch.testing.assert_close(x_e, expected_e)
    torch.testing.assert_close(x_s, mask[:, :, None, None] * x, rtol=0, atol=0)


def test_importance_uses_one_mlp_on_both_poolings() -> None:
    """Only the avg and max branches sharing one MLP give I; either branch alone does not."""
    cram = CRAM(16, 8, reduction=2)
    x = torch.randn(2, 16, 6, 6) * 3
    w1, w2 = cram.mlp[0].weight.flatten(1), cram.mlp[2].weight.flatten(1)
    flat = x.flatten(2)
    a = torch.relu(flat.mean(2) @ w1.T) @ w2.T
    m = torch.relu(flat.max(2).values @ w1.T) @ w2.T
    with torch.no_grad(), record_channel_importance([cram]) as recorded:
        cram(x)
    got = recorded[0]
    torch.testing.assert_close(got, torch.sigmoid(a + m))
    for wrong in (torch.sigmoid(a), torch.sigmoid(m), (torch.sigmoid(a) + torch.sigmoid(m)) / 2):
        assert not torch.allclose(got, wrong, atol=1e-4)


def test_mask_threshold_is_relative_to_the_most_important_channel() -> None:
    """softmax(I)_k / max_j softmax(I)_j = exp(I_k - max I): channel k is suppressed exactly
    when I_k >= max I + ln delta."""
    top = 0.8
    importance = torch.tensor([[top, top + math.log(0.9) + 1e-4, top + math.log(0.9) - 1e-4, 0.1]])
    torch.testing.assert_close(
        suppression_mask(importance, omega=0.3, delta=0.9), torch.tensor([[0.3, 0.3, 1.0, 1.0]])
    )
    # delta = 1 suppresses the top channel only; omega = 0 removes it
    torch.testing.assert_close(
        suppression_mask(importance, omega=0.0, delta=1.0), torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    )


def test_mask_reads_importance_after_softmax_over_channels() -> None:
    """Ratios of softmax(I), not of I: with I = (0.5, 0.46), 0.46/0.5 < 0.95 but
    exp(-0.04) > 0.95, so both channels are suppressed."""
    importance = torch.tensor([[0.5, 0.46]])
    torch.testing.assert_close(
        suppression_mask(importance, omega=0.5, delta=0.95), torch.tensor([[0.5, 0.5]])
    )


def test_mask_keeps_the_dtype_and_ignores_gradients() -> None:
    importance = torch.rand(2, 8, dtype=torch.float64, requires_grad=True)
    mask = suppression_mask(importance, 0.5, 0.9)
    assert mask.dtype == torch.float64 and mask.grad_fn is None
    torch.testing.assert_close(mask, ref_mask(importance.detach(), 0.5, 0.9).double())


def test_pmg_conv_layer_is_1x1_then_3x3_and_keeps_the_map_size() -> None:
    """PMG's Conv_layer: 1x1 conv to C_a/2, BN, ReLU, then 3x3 conv (padding 1), BN, ReLU."""
    cram = CRAM(16, 8, reduction=4, conv_layer="pmg")
    _randomise_batchnorms(cram)
    cram.eval()
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        x_e, _ = cram(x)
        enhanced = ref_importance(cram, x)[:, :, None, None] * x
        first, second = cram.conv_layer
        y = ref_conv_bn_relu(first, enhanced)
        conv, bn = second[0], second[1]
        assert conv.bias is None and conv.weight.shape == (8, 4, 3, 3)
        y = torch.nn.functional.conv2d(y, conv.weight, padding=1)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        y = (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(x_e, torch.relu(y))


def test_defaults_are_the_papers() -> None:
    """omega = 0.5, delta = 0.9, r = 16, light Conv_layer, PMG's max-pooled 512-wide heads,
    three SMRAM stages with L_div = 1 - h, alpha, beta, gamma = 2, 1, 1."""
    importance = torch.rand(3, 40)
    torch.testing.assert_close(suppression_mask(importance), ref_mask(importance, 0.5, 0.9))
    cram = CRAM(64, 8)
    assert (cram.in_channels, cram.out_channels) == (64, 8)
    assert (cram.omega, cram.delta, cram.reduction, cram.mlp[0].out_channels) == (0.5, 0.9, 16, 4)
    assert not list(cram.gate.parameters())  # the hook point adds nothing to the state dict
    assert [type(m) for m in cram.conv_layer] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    cbam = CBAMAttention(64, 8)
    assert (cbam.in_channels, cbam.out_channels, cbam.reduction) == (64, 8, 16)
    assert cbam.cbam.channel.fc1.out_channels == 4
    identity = IdentityAttention(64, 8)
    assert (identity.in_channels, identity.out_channels) == (64, 8)
    head = ClassifierHead(8, 3)
    assert (head.hidden, head.pool_type, head.mlp[1].out_features) == (512, "max", 512)
    smram = SMRAM(8)
    assert (smram.num_stages, smram.loss_form) == (3, "1-h")
    loss = CRASMRALoss()
    assert (loss.alpha, loss.beta, loss.gamma) == (2.0, 1.0, 1.0)
    net = CRASMRANet("resnet10t", 3)
    expected = {"omega": 0.5, "delta": 0.9, "reduction": 16, "head_channels": 512}
    assert {k: net.config[k] for k in expected} == expected
    assert (net.config["head_pool"], net.config["conv_layer"], net.variant) == (
        "max",
        "light",
        "cra-smra",
    )
    assert net.stage_names == ("stage3", "stage4", "stage5") and net.num_classes == 3
    assert net.heads[0].hidden == 512


def test_module_defaults_are_the_papers() -> None:
    module = build_module(backbone="resnet10t", num_classes=4)
    criterion = module.criterion
    assert (criterion.alpha, criterion.beta, criterion.gamma) == (2.0, 1.0, 1.0)
    net = module.net
    assert net.variant == "cra-smra" and net.stage_names == ("stage3", "stage4", "stage5")
    for cram in net.attention:
        assert (cram.omega, cram.delta, cram.reduction, cram.out_channels) == (0.5, 0.9, 16, 512)
        assert len(cram.conv_layer) == 3  # the light Conv_layer
    assert (net.heads[0].pool_type, net.heads[0].hidden) == ("max", 512)
    assert module.smram is not None and module.smram.channels == 512


def test_the_documented_ranges_are_accepted_at_their_edges() -> None:
    """omega in [0, 1], delta in (0, 1], r >= 1, at least one class and one SMRAM stage."""
    for omega, delta in [(0.0, 1.0), (1.0, 1e-6)]:
        CRAM(8, 4, reduction=1, omega=omega, delta=delta)
        validate_hparams("resnet18", 1, omega=omega, delta=delta, reduction=1)
    CBAMAttention(8, 4, reduction=1)
    assert CRAM(8, 4, reduction=8).mlp[0].out_channels == 1
    assert CBAMAttention(8, 4, reduction=8).cbam.channel.fc1.out_channels == 1
    resolved = validate_hparams("resnet18", 3, head_channels=1, head_hidden=1)
    assert resolved["pretrained"] is False
    SMRAM(4, num_stages=1)
    CRASMRALoss(alpha=0.0, beta=0.0, gamma=0.0)
    for bad in (dict(omega=-0.01), dict(omega=1.01), dict(delta=0.0), dict(delta=1.01)):
        with pytest.raises(ValueError):
            CRAM(8, 4, **bad)
        with pytest.raises(ValueError):
            validate_hparams("resnet18", 3, **bad)
    for bad in (dict(reduction=0), dict(head_channels=0), dict(head_hidden=0)):
        with pytest.raises(ValueError):
            validate_hparams("resnet18", 3, **bad)
    for flag in ("omega", "delta"):
        with pytest.raises(ValueError, match=flag):
            validate_hparams("resnet18", 3, **{flag: True})
    assert build_conv_layer("pmg", 8, 3)[0][0].out_channels == 1
    for bad_classes in (0, 2.0, True):
        with pytest.raises(ValueError):
            validate_hparams("resnet18", bad_classes)
    with pytest.raises(ValueError):
        SMRAM(4, num_stages=0)
    with pytest.raises(ValueError, match=r"\(B, C\), got shape \(2, 3, 4\)"):
        suppression_mask(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, S, H, W\), got shape \(2, 3\)"):
        diversity_loss(torch.rand(2, 3))


# ---- the network: which map feeds what ----------------------------------------------------------


def _spy_network(net: CRASMRANet, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record every backbone segment call, every attention module's input and output, the map
    each stage head pools and the vector the concat head classifies."""
    seen: dict[str, list] = {"segments": [], "attention": [], "pooled": [], "concat": []}
    original = net.backbone.forward_segment

    def forward_segment(index: int, x: Tensor) -> Tensor:
        out = original(index, x)
        seen["segments"].append((index, x, out))
        return out

    monkeypatch.setattr(net.backbone, "forward_segment", forward_segment)
    for module in net.attention:
        module.register_forward_hook(
            lambda mod, args, out: seen["attention"].append((mod, args[0], out))
        )
    for head in net.heads:
        head.pool.register_forward_hook(lambda mod, args, out: seen["pooled"].append(args[0]))
    net.concat_head.mlp.register_forward_hook(lambda mod, args, out: seen["concat"].append(args[0]))
    return seen


@pytest.mark.parametrize(("backbone", "size"), CNN_AND_TRANSFORMERS)
def test_each_stage_reads_the_suppressed_map_and_heads_read_the_enhanced_map(
    monkeypatch: pytest.MonkeyPatch, backbone: str, size: int
) -> None:
    """Segment i+1 reads X_s = S X of stage i; the heads and ``features`` are X_e."""
    net = create_model(backbone, 5, variant="cram", img_size=size, **TINY_NET).eval()
    seen = _spy_network(net, monkeypatch)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = net(images)
    assert [i for i, _, _ in seen["segments"]] == [0, 1, 2]
    assert seen["segments"][0][1] is images
    stage_map = net.backbone.stage_map  # (B, C, H, W) of a segment's input or output
    for i, (cram, x, (x_e, x_s)) in enumerate(seen["attention"]):
        output = seen["segments"][i][2]
        assert x.dim() == 4 and torch.equal(x, stage_map(output))  # CRAM reads the stage's X
        importance = ref_importance(cram, x)
        torch.testing.assert_close(x_s, ref_mask(importance, 0.5, 0.9)[:, :, None, None] * x)
        assert not torch.equal(x_s, x)
        if i + 1 < len(seen["segments"]):
            next_input = seen["segments"][i + 1][1]
            assert torch.equal(stage_map(next_input), x_s)
            assert not torch.equal(stage_map(next_input), x)
            if hasattr(output, "prefix"):  # a ViT's class token passes CRAM unchanged
                assert next_input.prefix is output.prefix
        assert torch.equal(out.features[i], x_e)
        assert torch.equal(seen["pooled"][i], x_e)
    pooled = [f.flatten(2).max(dim=2).values for f in out.features]
    with torch.no_grad():
        for head, p, logits in zip(net.heads, pooled, out.stage_logits, strict=True):
            torch.testing.assert_close(logits, head.mlp(p))
        torch.testing.assert_close(seen["concat"][0], torch.cat(pooled, dim=1))
        torch.testing.assert_close(out.concat_logits, net.concat_head.mlp(torch.cat(pooled, 1)))


@pytest.mark.parametrize(
    ("variant", "module"), [("baseline", IdentityAttention), ("cbam", CBAMAttention)]
)
def test_ablation_variants_get_the_same_conv_layer_and_reduction(
    variant: str, module: type
) -> None:
    """Table 3's rows differ only in the attention: Conv_layer and r reach every variant."""
    net = create_model("resnet10t", 3, variant=variant, conv_layer="pmg", reduction=4, **TINY_NET)
    for attention, channels in zip(net.attention, net.backbone.stage_channels, strict=True):
        assert type(attention) is module
        assert len(attention.conv_layer) == 2  # PMG's two blocks
        if variant == "cbam":
            assert attention.cbam.channel.fc1.out_channels == channels // 4


def test_create_smram_matches_the_network() -> None:
    net = create_model("resnet10t", 3, stage_indices=[1, 2, 3, 4], **TINY_NET)
    smram = create_smram(net, loss_form="-h")
    assert (smram.channels, smram.num_stages, smram.loss_form) == (16, 4, "-h")


def test_prediction_is_the_mean_of_the_four_softmaxes() -> None:
    net = create_model("resnet10t", 5, **TINY_NET).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 3, 64, 64))
    assert len(out.logits) == 4
    torch.testing.assert_close(out.probs, ref_probs(out))


# ---- SMRAM and L_div ---------------------------------------------------------------------------


def test_smram_matches_the_equations() -> None:
    """Average pooling to the smallest map, BN, phi, softmax over positions, CCMP, 1 - h."""
    smram = SMRAM(6, num_stages=3).train()
    features = [torch.randn(4, 6, 8, 12), torch.randn(4, 6, 4, 6), torch.randn(4, 6, 2, 3)]
    features = [f * 2 + 0.5 for f in features]
    loss, attention = smram(features)
    expected_loss, expected_attention = ref_smram(smram, features)
    torch.testing.assert_close(attention, expected_attention)
    torch.testing.assert_close(loss, expected_loss)
    assert 0.0 < loss.item() < 1 - 1 / 3


def test_smram_learns_only_phi() -> None:
    """BN is non-affine and phi has no bias: a softmax over space ignores any shift."""
    smram = SMRAM(5, num_stages=3)
    names = {name: tuple(p.shape) for name, p in smram.named_parameters()}
    assert names == {f"phi.{i}.weight": (1, 5, 1, 1) for i in range(3)}


def test_smram_loss_form() -> None:
    """ "-h" differs from the default "1-h" by the constant 1."""
    features = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    default, minus_h = SMRAM(3, num_stages=2), SMRAM(3, num_stages=2, loss_form="-h")
    minus_h.load_state_dict(default.state_dict())
    loss, attention = default(features)
    other, _ = minus_h(features)
    torch.testing.assert_close(other, loss - 1)
    torch.testing.assert_close(loss, diversity_loss(attention, "1-h"))
    with pytest.raises(ValueError, match="loss_form"):
        SMRAM(3, loss_form="h")  # type: ignore[arg-type]


def test_smram_pools_by_average_not_max() -> None:
    """A map and its 2x upsampled copy plus zero-mean detail of random amplitude in every 2x2
    block agree in block means but not in block maxima: they get identical attention."""
    smram = SMRAM(2, num_stages=2).train()
    base = torch.randn(3, 2, 2, 2)

    def upsample(t: Tensor) -> Tensor:
        return t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2)  # zero mean per 2x2 block
    big = upsample(base) + upsample(3 * torch.rand(3, 2, 2, 2)) * checker
    with torch.no_grad():
        smram.phi[1].weight.copy_(smram.phi[0].weight)
    _, attention = smram([big, base])
    torch.testing.assert_close(attention[:, 0], attention[:, 1])


def test_smram_in_eval_mode_normalises_with_running_statistics() -> None:
    smram = SMRAM(4, num_stages=2).eval()
    for norm in smram.norms:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    features = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    _, attention = smram(features)
    for s, (f, norm, phi) in enumerate(zip(features, smram.norms, smram.phi, strict=True)):
        pooled = ref_block_mean(f, (2, 2))
        normed = (pooled - norm.running_mean[:, None, None]) / torch.sqrt(
            norm.running_var[:, None, None] + norm.eps
        )
        logits = torch.einsum("c,bchw->bhw", phi.weight.flatten(), normed).flatten(1)
        torch.testing.assert_close(attention[:, s].flatten(1), logits.softmax(dim=1))


def test_diversity_loss_hand_example() -> None:
    """h = (1/eps) sum_j max_s A[s, j], L_div = 1 - h, averaged over the batch."""
    spread = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]
    )  # max over stages: 0.7, 0.7, 0.25, 0.25 -> h = 1.9 / 3
    same = torch.full((3, 4), 0.25)  # three identical maps -> h = 1 / 3
    attention = torch.stack([spread, same]).view(2, 3, 2, 2)
    expected = 1 - (1.9 / 3 + 1 / 3) / 2
    torch.testing.assert_close(diversity_loss(attention), torch.tensor(expected))
    torch.testing.assert_close(diversity_loss(attention, form="-h"), torch.tensor(expected - 1))
    with pytest.raises(ValueError, match="form"):
        diversity_loss(attention, form="h")  # type: ignore[arg-type]


# ---- the engine: loss, gradients, prediction, metrics ------------------------------------------


def _module(**overrides) -> CRASMRAModule:
    return build_module(**{**TINY_MODULE, **overrides})


@pytest.mark.parametrize(
    ("weights", "expected"),
    [({}, (2.0, 1.0, 1.0)), ({"alpha": 1.5, "beta": 0.25, "gamma": 3.0}, (1.5, 0.25, 3.0))],
)
def test_total_loss_is_the_weighted_sum(weights: dict, expected: tuple) -> None:
    """L = alpha sum_i CE(y, p_i) + beta CE(y, p_concat) + gamma L_div (paper: 2, 1, 1)."""
    module = _module(**weights).train()
    images, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    out = module(images)
    total, parts = module.compute_loss(out, target)
    alpha, beta, gamma = expected
    stage_ce = [ref_cross_entropy(lg, target) for lg in out.stage_logits]
    div, _ = ref_smram(module.smram, list(out.features))
    reference = (
        alpha * sum(stage_ce) + beta * ref_cross_entropy(out.concat_logits, target) + gamma * div
    )
    torch.testing.assert_close(total, reference)
    torch.testing.assert_close(parts["diversity"], div.detach())
    torch.testing.assert_close(parts["stage5_ce"], stage_ce[2].detach())


def test_training_step_optimises_the_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss returned for backward is L of the batch, and it is logged with its parts."""
    module = _module(alpha=1.5, beta=0.5, gamma=2.0).train()
    images, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    logged: dict[str, object] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: value}))
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.update(values))
    total = module.training_step((images, target), 0)
    expected, parts = module.compute_loss(module(images), target)
    torch.testing.assert_close(total, expected)
    assert total.requires_grad
    torch.testing.assert_close(logged.pop("train/loss"), expected.detach())
    assert set(logged) == {f"train/{k}" for k in parts}
    for k, v in parts.items():
        torch.testing.assert_close(logged[f"train/{k}"], v)


@pytest.mark.parametrize(("backbone", "size"), [CNN_AND_TRANSFORMERS[0], CNN_AND_TRANSFORMERS[2]])
def test_smram_reads_the_enhanced_maps_and_its_gradient_reaches_the_network(
    backbone: str, size: int
) -> None:
    """With alpha = beta = 0 the loss is gamma L_div alone: it must train CRAM and the
    backbone through X_e, and SMRAM must read exactly the heads' maps."""
    module = _module(backbone=backbone, net={"img_size": size}, alpha=0.0, beta=0.0, gamma=1.0)
    module.train()
    inputs: list[list[Tensor]] = []
    module.smram.register_forward_hook(lambda mod, args, out: inputs.append(list(args[0])))
    out = module(torch.randn(4, 3, size, size))
    total, _ = module.compute_loss(out, torch.tensor([0, 1, 2, 3]))
    assert len(inputs) == 1 and all(
        a is b or torch.equal(a, b) for a, b in zip(inputs[0], out.features, strict=True)
    )
    total.backward()
    groups = module.net.parameter_groups()
    for name in ("backbone", "attention"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name
    for cram in module.net.attention:
        assert cram.mlp[0].weight.grad.abs().sum() > 0
        assert cram.conv_layer[0].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in module.smram.parameters())


def test_variants_without_smram_have_no_diversity_term() -> None:
    module = _module(variant="cram", gamma=5.0).train()
    target = torch.tensor([0, 1, 2, 3])
    out = module(torch.randn(4, 3, 64, 64))
    total, parts = module.compute_loss(out, target)
    assert module.smram is None and "diversity" not in parts
    reference = 2.0 * sum(ref_cross_entropy(lg, target) for lg in out.stage_logits)
    torch.testing.assert_close(total, reference + ref_cross_entropy(out.concat_logits, target))


def test_smram_matches_the_network() -> None:
    module = _module(head_channels=24, stage_indices=[1, 2, 3, 4])
    assert isinstance(module.smram, SMRAM)
    assert (module.smram.channels, module.smram.num_stages) == (24, 4)
    assert module.smram.loss_form == "1-h"


def _crafted_output(module: CRASMRAModule) -> tuple[ModelOutput, Tensor]:
    """Four heads that are right on 1, 2, 3 and 0 of four samples; their mean is right on all.

    Every wrong head puts 2.0 on its own wrong class and 1.9 on the target; the concat head
    also puts the target last on two samples, so its top-5 accuracy is 1/2.
    """
    classes, target = 6, torch.tensor([0, 1, 2, 3])
    right_on = [{0}, {0, 1}, {0, 1, 2}, set()]
    logits = []
    for h, right in enumerate(right_on):
        lg = torch.zeros(4, classes)
        for b, t in enumerate(target.tolist()):
            lg[b, t] = 1.9
            if b not in right:
                lg[b, (t + 1 + h) % classes] = 2.0
            if h == 3 and b < 2:
                lg[b, t] = -5.0
        logits.append(lg)
    features = tuple(torch.randn(4, module.net.head_channels, s, s) for s in (8, 4, 2))
    output = ModelOutput(
        stage_logits=tuple(logits[:3]),
        concat_logits=logits[3],
        features=features,
        stage_names=module.net.stage_names,
    )
    return output, target


@pytest.mark.parametrize(
    ("step", "metrics", "prefix"),
    [("validation_step", "val_metrics", "val/"), ("test_step", "test_metrics", "test/")],
)
def test_eval_scores_every_head_and_their_mean(
    step: str, metrics: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-1 and top-5 of each head, and of the mean of the four softmaxes ("combined");
    the logged loss is the training objective."""
    module = _module(num_classes=6).eval()
    output, target = _crafted_output(module)
    images = torch.zeros(4, 3, 8, 8)
    monkeypatch.setattr(module, "forward", lambda x: output if x is images else None)
    logged: dict[str, tuple] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: (value, kw)}))
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.update(dict=(values, kw)))
    getattr(module, step)((images, target), 0)
    collection = getattr(module, metrics)
    scores = {k: float(v) for k, v in collection.compute().items()}

    heads = dict(zip(("stage3", "stage4", "stage5", "concat"), output.logits, strict=True))
    probs = {name: lg.softmax(dim=1) for name, lg in heads.items()}
    probs["combined"] = ref_probs(output)
    expected = {}
    for name, p in probs.items():
        expected[f"{prefix}{name}_top1"] = float((p.argmax(dim=1) == target).float().mean())
        top5 = p.topk(5, dim=1).indices
        expected[f"{prefix}{name}_top5"] = float((top5 == target[:, None]).any(1).float().mean())
    top1 = [expected[f"{prefix}{n}_top1"] for n in probs]
    assert top1 == [0.25, 0.5, 0.75, 0.0, 1.0]  # the design: every head scores differently
    assert expected[f"{prefix}concat_top5"] == 0.5
    assert scores == pytest.approx(expected)
    loss, kwargs = logged[f"{prefix}loss"]
    with torch.no_grad():
        torch.testing.assert_close(loss, module.compute_loss(output, target)[0])
    assert kwargs == {"batch_size": 4, "sync_dist": True}
    assert logged["dict"][0] is collection


def test_accuracy_is_over_samples_not_averaged_over_classes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Top-k accuracy is the fraction of images: 3 of 4 right is 0.75 even when the one
    miss is the only image of its class (the class average would be 0.5)."""
    module = _module(num_classes=6).eval()
    target = torch.tensor([0, 0, 0, 1])
    logits = torch.zeros(4, 6)
    logits[:, 0] = 2.0
    logits[3, 1] = -5.0  # the class-1 image: its class is last, outside the top 5
    output = ModelOutput(
        stage_logits=(logits,) * 3,
        concat_logits=logits,
        features=tuple(torch.randn(4, 16, s, s) for s in (8, 4, 2)),
        stage_names=module.net.stage_names,
    )
    monkeypatch.setattr(module, "forward", lambda x: output)
    monkeypatch.setattr(module, "log", lambda *a, **kw: None)
    monkeypatch.setattr(module, "log_dict", lambda *a, **kw: None)
    module.validation_step((torch.zeros(4, 3, 8, 8), target), 0)
    scores = module.val_metrics.compute()
    assert len(scores) == 10
    assert all(float(v) == pytest.approx(0.75) for v in scores.values())


def test_channels_last_computes_the_same_prediction() -> None:
    torch.manual_seed(0)
    plain = _module().eval()
    torch.manual_seed(0)
    fast = _module(channels_last=True).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(images).probs, plain(images).probs)


def test_pretrained_weights_reach_the_backbone(tmp_path) -> None:
    """--model.net.pretrained PATH initialises the backbone from that file."""
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t")
    path = tmp_path / "resnet10t.safetensors"
    save_file(source.state_dict(), str(path))
    module = _module(pretrained=str(path))
    torch.testing.assert_close(
        module.net.backbone.model.layer1[0].conv1.weight, source.layer1[0].conv1.weight
    )


def test_fewer_than_five_classes_have_no_top5() -> None:
    module = _module(num_classes=4)
    names = {"stage3", "stage4", "stage5", "concat", "combined"}
    assert set(module.val_metrics) == {f"val/{n}_top1" for n in names}
    assert set(_module(num_classes=5).test_metrics) == {
        f"test/{n}_top{k}" for n in names for k in (1, 5)
    }


def test_predict_step_returns_the_mean_of_the_four_softmaxes() -> None:
    module = _module().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref_probs(module(images))
        torch.testing.assert_close(module.predict_step((images, torch.zeros(2)), 0), expected)
        torch.testing.assert_close(module.predict_step(images, 0), expected)


def test_module_hyperparameters_reach_the_network() -> None:
    module = _module(
        variant="cram",
        omega=0.3,
        delta=0.7,
        reduction=2,
        head_channels=12,
        head_hidden=6,
        head_pool="avg",
        conv_layer="pmg",
        stage_indices=[1, 2, 3],
        num_classes=7,
    )
    net = module.net
    assert (net.variant, net.num_classes, net.head_channels) == ("cram", 7, 12)
    assert net.stage_names == ("stage2", "stage3", "stage4")
    for cram, channels in zip(net.attention, net.backbone.stage_channels, strict=True):
        assert isinstance(cram, CRAM)
        assert (cram.omega, cram.delta, cram.reduction) == (0.3, 0.7, 2)
        assert cram.mlp[0].out_channels == channels // 2
        assert len(cram.conv_layer) == 2 and cram.out_channels == 12
    for head in (*net.heads, net.concat_head):
        assert (head.pool_type, head.hidden, head.num_classes) == ("avg", 6, 7)
    assert module.head_names == ("stage2", "stage3", "stage4", "concat", "combined")


# ---- the optimiser and the schedule ------------------------------------------------------------


def _configure(module: CRASMRAModule, steps: int = 100, epochs: int | None = 10) -> dict:
    """configure_optimizers for a trainer that will run ``steps`` steps over ``epochs`` epochs."""
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps, max_epochs=epochs)
    return module.configure_optimizers()


def _expected_groups(module: CRASMRAModule) -> dict[str, set[int]]:
    groups = module.net.parameter_groups()
    return {
        "backbone": {id(p) for p in module.net.backbone.parameters()},
        "attention": {id(p) for p in module.net.attention.parameters()},
        "heads": {id(p) for p in groups["heads"]}
        | {id(p) for p in module.net.concat_head.parameters()},
        "smram": {id(p) for p in module.smram.parameters()},
    }


def test_optimiser_follows_the_paper_recipe_by_default() -> None:
    """SGD, momentum 0.9, weight decay 1e-5; 2e-4 for backbone and SMRAM, 6e-3 for CRAM
    (with Conv_layer) and the heads."""
    module = _module()
    config = _configure(module)
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone", "attention", "heads", "smram"]
    rates = {"backbone": 2e-4, "attention": 6e-3, "heads": 6e-3, "smram": 2e-4}
    for name, ids in _expected_groups(module).items():
        group = groups[name]
        assert {id(p) for p in group["params"]} == ids, name
        assert group["initial_lr"] == pytest.approx(rates[name])
        assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-5
        assert group["nesterov"] is False and group["dampening"] == 0
    every = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(module.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"
    # no warm-up; cosine decay to zero over the run, per step
    scheduler = config["lr_scheduler"]["scheduler"]
    for step in range(101):
        factor = 0.5 * (1 + math.cos(math.pi * step / 100))
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(rates[group["name"]] * factor, abs=1e-12)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    "bad",
    [
        {"lr_backbone": 0.0},
        {"lr_attention": -1e-3},
        {"lr_heads": math.inf},
        {"lr_smram": 0.0},
        {"lr_smram": math.nan},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"weight_decay": -1e-5},
        {"weight_decay": math.inf},
        {"warmup_epochs": -1.0},
        {"min_lr_ratio": 1.5},
        {"min_lr_ratio": -0.1},
    ],
)
def test_optimiser_settings_outside_their_range_are_refused(bad: dict) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=rf"^{name} must .*change --model\.optim\.{name}\.$"):
        _module(**bad)
    # The part checks itself, before any network is built.
    with pytest.raises(ValueError, match=rf"change --model\.optim\.{name}\.$"):
        OptimConfig(**bad)


def test_optimiser_settings_at_the_edge_of_their_range_are_accepted() -> None:
    """Momentum 0 (plain SGD), no weight decay, no warm-up, a constant rate at the end."""
    module = _module(momentum=0.0, weight_decay=0.0, warmup_epochs=0.0, min_lr_ratio=1.0)
    optimizer = _configure(module)["optimizer"]
    assert all(g["momentum"] == 0.0 and g["weight_decay"] == 0.0 for g in optimizer.param_groups)


def test_optimiser_settings_reach_every_group() -> None:
    module = _module(
        lr_backbone=1e-3,
        lr_attention=2e-3,
        lr_heads=3e-3,
        lr_smram=4e-3,
        momentum=0.8,
        weight_decay=3e-4,
        nesterov=True,
    )
    groups = {g["name"]: g for g in _configure(module)["optimizer"].param_groups}
    rates = {"backbone": 1e-3, "attention": 2e-3, "heads": 3e-3, "smram": 4e-3}
    for name, group in groups.items():
        assert group["initial_lr"] == pytest.approx(rates[name])
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 3e-4, True)
    # Nesterov needs momentum: without it the flag is dropped rather than rejected by SGD
    plain_sgd = _configure(_module(momentum=0.0, nesterov=True))["optimizer"]
    assert all(g["nesterov"] is False for g in plain_sgd.param_groups)


def ref_multiplier(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("warmup_epochs", "min_lr_ratio", "epochs", "warmup_steps"),
    [
        (0.0, 0.0, 10, 0),
        (2.0, 0.1, 10, 20),
        (1.5, 0.0, 10, 15),
        (20.0, 0.0, 10, 99),  # warm-up never takes the whole run: the last step is cosine's
        (0.5, 0.2, 1, 50),
        (0.25, 0.0, None, 25),  # no epoch limit: the run counts as one epoch
    ],
)
def test_schedule_warms_up_then_decays_each_group_from_its_own_rate(
    warmup_epochs: float, min_lr_ratio: float, epochs: int | None, warmup_steps: int
) -> None:
    """Per optimiser step: lr_g(t) = base_g * multiplier(t) over a 100-step run, and the
    floor after it."""
    module = _module(
        lr_backbone=1e-3,
        lr_attention=5e-3,
        lr_heads=2e-2,
        lr_smram=4e-4,
        warmup_epochs=warmup_epochs,
        min_lr_ratio=min_lr_ratio,
    )
    config = _configure(module, steps=100, epochs=epochs)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    base = {"backbone": 1e-3, "attention": 5e-3, "heads": 2e-2, "smram": 4e-4}
    for step in range(131):
        factor = ref_multiplier(step, 100, warmup_steps, min_lr_ratio)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(base[group["name"]] * factor), (step, group["name"])
        optimizer.step()
        scheduler.step()


def test_schedule_defaults_are_plain_cosine_to_zero() -> None:
    multiplier = WarmupCosine(100)
    assert [multiplier(t) for t in (0, 50, 100, 130)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, 100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
