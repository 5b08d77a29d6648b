"""CRASMRANet and create_model: structure, gradients, configuration, validation, weights."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from crasmra import SMRAM, VARIANTS, CRASMRALoss, CRASMRANet, ModelOutput, create_model
from crasmra.layers import CRAM, CBAMAttention, IdentityAttention
from crasmra.losses import trains_with_smram
from crasmra.model import (
    Network,
    PlainNet,
    PretrainedWeightsError,
    build_network,
    create_smram,
    validate_hparams,
)

TINY = dict(head_channels=32, head_hidden=16)
PAPER_BACKBONES = ["resnet50", "resnet101", "densenet161", "convnext_atto", "efficientnet_b0"]


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_shapes_for_every_backbone_at_two_sizes(backbone: str) -> None:
    net = create_model(backbone, num_classes=5, **TINY).eval()
    strides = net.backbone.stage_reductions
    for h, w in [(64, 64), (96, 64)]:
        with torch.no_grad():
            out = net(torch.randn(2, 3, h, w))
        assert isinstance(out, ModelOutput)
        assert len(out.stage_logits) == 3 and out.stage_names == net.stage_names
        assert all(lg.shape == (2, 5) for lg in out.logits)
        for f, s in zip(out.features, strides, strict=True):
            assert f.shape == (2, 32, -(-h // s), -(-w // s))
        assert torch.isfinite(out.probs).all()
        torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(2))


def test_probs_is_mean_of_head_softmaxes() -> None:
    net = create_model("resnet10t", 4, **TINY).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    expected = sum(lg.softmax(-1) for lg in out.logits) / 4
    torch.testing.assert_close(out.probs, expected)


@pytest.mark.parametrize(
    ("variant", "module"),
    [("baseline", IdentityAttention), ("cbam", CBAMAttention), ("cram", CRAM), ("cra-smra", CRAM)],
)
def test_variants_choose_the_attention_module(variant: str, module: type) -> None:
    net = create_model("resnet10t", 3, variant=variant, **TINY)
    assert len(net.attention) == 3 and all(type(m) is module for m in net.attention)
    assert trains_with_smram(variant) == (variant == "cra-smra")
    assert net.variant == variant


def test_smram_is_never_part_of_the_network() -> None:
    net = create_model("resnet10t", 3, **TINY)
    assert not any(isinstance(m, SMRAM) for m in net.modules())
    smram = create_smram(net)
    smram_shapes = {tuple(p.shape) for p in smram.parameters()}
    assert all("phi" not in k and "smram" not in k.lower() for k in net.state_dict())
    assert smram_shapes and smram.num_stages == 3 and smram.channels == 32
    # Apart from batch-norm statistics, training and evaluation run the same network: the
    # suppression stays in it at test time, and nothing of SMRAM is run.
    x = torch.randn(2, 3, 64, 64)
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():
        train_out = net(x)
        eval_out = net.eval()(x)
    trained = (*train_out.logits, *train_out.features)
    evaluated = (*eval_out.logits, *eval_out.features)
    for a, b in zip(trained, evaluated, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant: str) -> None:
    torch.manual_seed(0)
    net = create_model("resnet10t", 4, variant=variant, **TINY).train()
    # timm zero-initialises each residual block's last BN scale, which makes the gradient of
    # the block's inner convs exactly zero at step one; give the scales non-zero values.
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    smram = create_smram(net) if trains_with_smram(net.variant) else None
    criterion = CRASMRALoss()
    out = net(torch.randn(4, 3, 64, 64))
    div = smram(out.features)[0] if smram is not None else None
    total, parts = criterion(out, torch.tensor([0, 1, 2, 3]), div)
    total.backward()
    modules = [net, criterion] + ([smram] if smram is not None else [])
    for module in modules:
        for name, p in module.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert ("diversity" in parts) == (variant == "cra-smra")


def test_hyperparameters_reach_the_modules() -> None:
    net = create_model(
        "resnet10t",
        6,
        omega=0.3,
        delta=0.8,
        reduction=4,
        head_pool="avg",
        head_channels=24,
        head_hidden=12,
        conv_layer="pmg",
        stage_indices=[1, 2, 3],
        suppress_source="enhanced",
        suppress_top_k=2,
    )
    assert net.stage_names == ("stage2", "stage3", "stage4")
    assert net.config["suppress_source"] == "enhanced"
    assert net.config["suppress_top_k"] == 2
    for cram, c in zip(net.attention, net.backbone.stage_channels, strict=True):
        assert (cram.omega, cram.delta, cram.reduction) == (0.3, 0.8, 4)
        assert cram.suppress_source == "enhanced"
        assert cram.suppress_top_k == 2
        assert cram.mlp[0].out_channels == c // 4
        assert cram.conv_layer[1][0].kernel_size == (3, 3)
        assert cram.out_channels == 24
    for head in [*net.heads, net.concat_head]:
        assert head.pool_type == "avg" and head.hidden == 12 and head.num_classes == 6
    assert net.concat_head.in_channels == 3 * 24


def test_parameter_groups_partition_trainable_parameters() -> None:
    net = create_model("resnet10t", 3, variant="cbam", **TINY)
    groups = net.parameter_groups()
    assert list(groups) == ["backbone", "attention", "heads"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in groups["attention"]} == {id(p) for p in net.attention.parameters()}


def test_config_round_trip_rebuilds_the_architecture() -> None:
    net = create_model("resnet10t", 3, variant="cram", omega=0.4, **TINY).eval()
    config = json.loads(json.dumps(net.config))
    assert config["pretrained"] is False and config["stage_indices"] == [2, 3, 4]
    rebuilt = CRASMRANet(**config).eval()
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())  # strict: identical keys and shapes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).probs, net(x).probs)


def test_reset_classifier_rebuilds_every_head() -> None:
    net = create_model("resnet10t", 3, **TINY)
    old = [p.clone() for p in net.heads[0].parameters()]
    net.reset_classifier(9)
    assert net.num_classes == 9 and net.config["num_classes"] == 9
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 64, 64))
    assert all(lg.shape == (1, 9) for lg in out.logits)
    new = list(net.heads[0].parameters())
    assert new[-1].shape == (9,) and old[-1].shape == (3,)
    with pytest.raises(ValueError):
        net.reset_classifier(0)
    net.to(device="meta", dtype=torch.float64)
    net.reset_classifier(1)  # new heads follow the network's device and dtype
    assert net.num_classes == 1
    assert {(p.device.type, p.dtype) for p in net.parameters()} == {("meta", torch.float64)}


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        (
            "resnet10t",
            {
                "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225),
                "input_size": (3, 176, 176),
                "crop_pct": 0.875,
                "interpolation": "bicubic",
            },
        ),
        (
            "inception_v3",
            {
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
                "input_size": (3, 299, 299),
                "crop_pct": 0.875,
                "interpolation": "bicubic",
            },
        ),
    ],
)
def test_data_config_is_the_backbones_own(backbone: str, expected: dict) -> None:
    """Each backbone brings the preprocessing of its timm weights, not a shared default."""
    net = create_model(backbone, 3, **TINY)
    assert net.data_config == expected
    assert json.loads(json.dumps(net.data_config)) == {
        k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("resnet5O", 3), {}, "Did you mean"),
        (("resnet18", 3, "cram++"), {}, "baseline"),
        (("resnet18", 0), {}, "num_classes"),
        (("resnet18", 3), {"omega": 1.5}, "omega"),
        (("resnet18", 3), {"delta": 0.0}, "delta"),
        (("resnet18", 3), {"reduction": 0}, "reduction"),
        (("resnet18", 3), {"head_pool": "median"}, "head_pool"),
        (("resnet18", 3), {"conv_layer": "heavy"}, "conv_layer"),
        (("resnet18", 3), {"suppress_source": "mask"}, "suppress_source.*'enhanced'"),
        (("resnet18", 3), {"suppress_top_k": 0}, "--model.net.suppress_top_k"),
        (("resnet18", 3), {"omgea": 0.5}, "Unknown hyperparameter"),
        (("resnet18", 3), {"stage_indices": [4, 9]}, "out of range"),
    ],
)
def test_validation_errors_say_what_to_change(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        validate_hparams(*args, **kwargs)


def test_validate_hparams_fills_defaults() -> None:
    resolved = validate_hparams("resnet50", 200)
    assert resolved["stage_indices"] == [2, 3, 4]
    assert resolved["head_channels"] == 512 and resolved["conv_layer"] == "light"
    assert (resolved["omega"], resolved["delta"], resolved["reduction"]) == (0.5, 0.9, 16)
    assert resolved["suppress_source"] == "input"
    assert resolved["suppress_top_k"] is None


def test_pretrained_path_loads_backbone_weights(tmp_path) -> None:
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.safetensors"
    save_file(source.state_dict(), str(path))
    net = create_model("resnet10t", 3, pretrained=str(path), **TINY)
    torch.testing.assert_close(net.backbone.model.conv1[0].weight, source.conv1[0].weight)
    assert net.config["pretrained"] is False
    with pytest.raises(FileNotFoundError):
        create_model("resnet10t", 3, pretrained=tmp_path / "nope.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        create_model("resnet10t", 3, pretrained=wrong)


def test_pretrained_true_offline_is_a_clear_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr("timm.models._builder.load_pretrained", offline)
    with pytest.raises(PretrainedWeightsError, match="safetensors"):
        create_model("resnet10t", 3, pretrained=True)


# ---------------------------------------------------------------------------------------------
# The plain reference variant: timm's own classifier, fine-tuned with cross-entropy
# ---------------------------------------------------------------------------------------------
def _timm_twin(net: CRASMRANet, name: str, num_classes: int) -> torch.nn.Module:
    """timm's own model for ``num_classes`` with the plain network's weights."""
    twin = timm.create_model(name, num_classes=num_classes)
    state = {k.removeprefix("backbone.model."): v for k, v in net.state_dict().items()}
    twin.load_state_dict(state)  # strict: the plain network is exactly timm's model
    return twin


# efficientnet_b0: timm's head includes conv_head/bn2, which the staged variants drop.
@pytest.mark.parametrize("backbone", ["resnet10t", "efficientnet_b0"])
def test_plain_logits_equal_timms_own_model(backbone: str) -> None:
    torch.manual_seed(0)
    net = create_model(backbone, 5, variant="plain").eval()
    twin = _timm_twin(net, backbone, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        expected = twin(x)
    assert out.head_names == net.head_names == ("classifier",)
    assert out.stage_logits == () and out.concat_logits is None and len(out.logits) == 1
    torch.testing.assert_close(out.logits[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(out.probs, expected.softmax(dim=-1))
    assert out.features[0].shape == (2, twin.num_features, 2, 2)
    assert out.stage_names == net.stage_names == (f"stage{len(twin.feature_info)}",)


def test_plain_has_no_attention_heads_or_smram() -> None:
    net = create_model("resnet10t", 5, variant="plain", **TINY)
    assert isinstance(net, PlainNet) and isinstance(net, Network)
    assert len(net.attention) == 0 and net.added_modules() == []
    assert not hasattr(net, "heads") and not hasattr(net, "concat_head")
    assert not trains_with_smram("plain") and net.variant == "plain"
    assert all(k.startswith("backbone.model.") for k in net.state_dict())
    assert net.backbone.model.fc.out_features == 5
    rebuilt = build_network(**json.loads(json.dumps(net.config)))
    assert isinstance(rebuilt, PlainNet)
    assert list(rebuilt.state_dict()) == list(net.state_dict())
    with pytest.raises(ValueError, match="build_network"):
        CRASMRANet(**net.config)
    net.reset_classifier(7)
    assert net.backbone.model.fc.out_features == 7 and net.config["num_classes"] == 7
    assert net.num_classes == 7
    assert net(torch.randn(1, 3, 64, 64)).probs.shape == (1, 7)


def test_plain_loss_is_cross_entropy_whatever_alpha_and_beta() -> None:
    torch.manual_seed(0)
    net = create_model("resnet10t", 5, variant="plain")
    out = net(torch.randn(4, 3, 32, 32))
    target = torch.tensor([0, 1, 2, 4])
    expected = F.cross_entropy(out.logits[0], target)
    for alpha, beta in [(2.0, 1.0), (5.0, 0.0)]:
        total, parts = CRASMRALoss(alpha=alpha, beta=beta)(out, target)
        torch.testing.assert_close(total, expected)
        assert set(parts) == {"classifier_ce"}
        torch.testing.assert_close(parts["classifier_ce"], expected.detach())


def test_plain_parameter_groups() -> None:
    net = create_model("resnet10t", 5, variant="plain")
    groups = net.parameter_groups()
    assert groups["attention"] == []
    fc = net.backbone.model.fc
    assert {id(p) for p in groups["heads"]} == {id(fc.weight), id(fc.bias)}
    grouped = groups["backbone"] + groups["heads"]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in net.parameters()}


def test_plain_loads_local_weights_and_ignores_the_classifier(tmp_path) -> None:
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.safetensors"
    save_file(source.state_dict(), str(path))
    net = create_model("resnet10t", 5, variant="plain", pretrained=str(path))
    torch.testing.assert_close(net.backbone.model.layer4[0].conv1.weight,
                               source.layer4[0].conv1.weight)
    assert net.backbone.model.fc.weight.shape == (5, 512)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        create_model("resnet10t", 5, variant="plain", pretrained=wrong)


# ---------------------------------------------------------------------------------------------
# variants, registered attention modules and the network's configuration
# ---------------------------------------------------------------------------------------------
class _Scaled(torch.nn.Module):
    """A registered attention module with an option of its own."""

    def __init__(self, in_channels: int, out_channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.proj = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(self.scale * x), x


@pytest.fixture
def scaled_registered(monkeypatch: pytest.MonkeyPatch) -> str:
    from crasmra.layers import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_attention("scaled")(_Scaled)
    return "scaled"


def test_variants_name_their_attention_modules(scaled_registered: str) -> None:
    from crasmra.model import attention_of, variant_names

    assert [attention_of(v) for v in ("baseline", "cbam", "cram", "cra-smra")] == [
        "identity", "cbam", "cram", "cram"]
    assert attention_of("plain") is None
    assert attention_of("scaled") == "scaled"  # a registered module is its own variant
    # The built-in modules are not listed twice (identity is baseline, cram a paper variant);
    # registered ones follow the built-in variants.
    names = variant_names()
    assert names[: len(VARIANTS)] == VARIANTS and "scaled" in names[len(VARIANTS):]
    assert "identity" not in names and names.count("cram") == names.count("cbam") == 1


def test_a_registered_module_gets_its_options(scaled_registered: str) -> None:
    net = create_model("resnet10t", 3, variant="scaled", attention_options={"scale": 2.5},
                       **TINY)
    assert [type(m) for m in net.attention] == [_Scaled] * 3
    assert {m.scale for m in net.attention} == {2.5}
    assert net.config["attention_options"] == {"scale": 2.5}
    with pytest.raises(ValueError, match="attention_options must be a mapping"):
        create_model("resnet10t", 3, variant="scaled", attention_options=[2.5], **TINY)


def test_a_network_not_loaded_from_a_checkpoint_has_no_inference_info() -> None:
    net = create_model("resnet10t", 3, **TINY)
    assert (net.classes, net.preprocessing, net.transform, net.checkpoint_path) == (
        None, None, None, None)
    # Its preprocessing is then the backbone's own (timm's data config).
    assert net.resolved_preprocessing().image_size == tuple(net.data_config["input_size"][1:])
    assert net.resolved_preprocessing().mean == tuple(net.data_config["mean"])


def test_bad_pretrained_arguments_say_what_is_wrong(tmp_path) -> None:
    from crasmra.model import validate_hparams

    with pytest.raises(ValueError, match="pretrained must be a bool or a file path, got 3"):
        validate_hparams("resnet10t", 3, pretrained=3)
    missing = tmp_path / "weights.pth"
    with pytest.raises(FileNotFoundError, match=r"weights\.pth"):
        validate_hparams("resnet10t", 3, pretrained=str(missing))
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        create_model("resnet10t", 3, **TINY).reset_classifier(0)


def test_the_model_branches_on_the_plain_variant_once() -> None:
    """One builder per variant: only the factory tells the plain variant from the others."""
    from conftest import REPO

    sources = {p.name: p.read_text() for p in (REPO / "src" / "crasmra" / "model").glob("*.py")}
    branches = {name: len(re.findall(r"== PLAIN|!= PLAIN|is PLAIN", text))
                for name, text in sources.items()}
    assert sum(branches.values()) == 1 and branches["factory.py"] == 1, branches
