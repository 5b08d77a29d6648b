"""StagedBackbone: stages match timm's own features, hooks act between stages, weights load."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from crasmra.backbones import (
    PretrainedWeightsError,
    StagedBackbone,
    check_backbone,
    resolve_stage_indices,
)

SMALL = ["resnet18", "densenet121", "convnext_atto", "efficientnet_b0"]


def _copy_by_order(src: dict, dst_module: torch.nn.Module) -> None:
    # timm's features_only wrappers rename flattened modules (features.x -> features_x) but keep
    # registration order, so tensors correspond one to one by position.
    dst = dst_module.state_dict()
    assert len(src) == len(dst)
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        assert sv.shape == dv.shape, (sk, dk)
    dst_module.load_state_dict(dict(zip(dst.keys(), src.values(), strict=True)))


@pytest.mark.parametrize("name", SMALL)
def test_stage_features_equal_timm_features_only(name: str) -> None:
    torch.manual_seed(0)
    ours = StagedBackbone(name).eval()
    reference = timm.create_model(name, features_only=True, out_indices=ours.stage_indices).eval()
    _copy_by_order(ours.model.state_dict(), reference)
    assert list(ours.stage_channels) == reference.feature_info.channels()
    assert list(ours.stage_reductions) == reference.feature_info.reduction()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        got, want = ours(x), reference(x)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_hook_output_feeds_the_next_stage() -> None:
    backbone = StagedBackbone("resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = backbone(x, hook=lambda i, f: f * 0.5)
        first = backbone.forward_segment(0, x)
        second = backbone.forward_segment(1, first * 0.5)
    torch.testing.assert_close(outs[0], first)
    torch.testing.assert_close(outs[1], second)


def test_resnet50_stage_names_channels_and_trimmed_head() -> None:
    backbone = StagedBackbone("resnet50")
    assert backbone.stage_names == ("stage3", "stage4", "stage5")
    assert backbone.stage_channels == (512, 1024, 2048)
    assert backbone.stage_reductions == (8, 16, 32)
    keys = backbone.model.state_dict()
    assert not any(k.startswith("fc.") for k in keys)
    assert backbone.data_config["input_size"] == (3, 224, 224)


def test_densenet161_attends_after_the_last_three_dense_blocks() -> None:
    backbone = StagedBackbone("densenet161")
    assert backbone.stage_channels == (768, 2112, 2208)
    segments = backbone._runner.segments
    assert segments[0][-1] == "features.denseblock2"
    assert segments[1][-1] == "features.denseblock3"
    assert segments[2][-2:] == ("features.denseblock4", "features.norm5")
    with torch.no_grad():
        outs = backbone.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 768, 8, 12), (1, 2112, 4, 6), (1, 2208, 2, 3)]


def test_custom_stage_indices_drop_later_stages() -> None:
    backbone = StagedBackbone("resnet18", stage_indices=(1, 2, 3))
    assert backbone.stage_names == ("stage2", "stage3", "stage4")
    assert not any(k.startswith("layer4.") for k in backbone.model.state_dict())


def test_stage_index_validation() -> None:
    assert resolve_stage_indices(5, None) == (2, 3, 4)
    assert resolve_stage_indices(5, [-3, -2, -1]) == (2, 3, 4)
    with pytest.raises(ValueError, match="at least 3"):
        resolve_stage_indices(2, None)
    with pytest.raises(ValueError, match="out of range"):
        resolve_stage_indices(5, [2, 5])
    with pytest.raises(ValueError, match="increasing"):
        resolve_stage_indices(5, [3, 2])
    with pytest.raises(ValueError, match="Did you mean"):
        check_backbone("resnet5O")


# ---- weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_ignore_classifier(tmp_path, suffix: str) -> None:
    source = timm.create_model("resnet18", num_classes=7)
    path = tmp_path / f"weights{suffix}"
    state = source.state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    backbone = StagedBackbone("resnet18", pretrained=path)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_wrong_weights_give_clear_errors(tmp_path) -> None:
    wrong = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), str(wrong))
    with pytest.raises(PretrainedWeightsError, match=r"unexpected.*resnet18"):
        StagedBackbone("resnet18", pretrained=wrong)
    with pytest.raises(FileNotFoundError, match="not found"):
        StagedBackbone("resnet18", pretrained=tmp_path / "missing.safetensors")
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": {"w": object()}}, pickled)
    with pytest.raises(PretrainedWeightsError, match="weights_only"):
        StagedBackbone("resnet18", pretrained=pickled)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(PretrainedWeightsError, match="Unsupported"):
        StagedBackbone("resnet18", pretrained=odd)


def test_pretrained_true_offline_raises_helpful_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr("timm.models._builder.load_pretrained", offline)
    with pytest.raises(PretrainedWeightsError, match="pretrained='/path/to") as info:
        StagedBackbone("resnet18", pretrained=True)
    assert "HF_HOME" in str(info.value) and "TORCH_HOME" in str(info.value)


def test_pretrained_true_uses_timm_loader(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("timm.models._builder.load_pretrained", lambda *a, **k: calls.append(1))
    StagedBackbone("resnet18", pretrained=True)
    assert calls == [1]


def test_final_features_run_the_last_stage_to_timms_feature_map() -> None:
    """EfficientNet's last stage then ends after conv_head and bn2, as forward_features does."""
    import timm

    torch.manual_seed(0)
    staged = StagedBackbone("tf_efficientnet_lite0", final_features=True).eval()
    reference = timm.create_model("tf_efficientnet_lite0").eval()
    reference.load_state_dict(staged.model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = staged(x)[-1]
        expected = reference.forward_features(x)
    assert staged.stage_channels[-1] == reference.num_features == 1280
    assert last.shape == expected.shape and torch.allclose(last, expected, atol=1e-5)
    # Without the switch the last stage is the last block's output (320 channels).
    assert StagedBackbone("tf_efficientnet_lite0").stage_channels[-1] == 320
    # A ResNet's last stage already is its feature map; a MobileNetV3 pools first.
    assert StagedBackbone("resnet10t", final_features=True).stage_channels[-1] == 512
    assert StagedBackbone("mobilenetv3_small_050", final_features=True).stage_channels[-1] == 288


def test_final_features_need_the_last_feature_stage() -> None:
    with pytest.raises(ValueError, match="final_features"):
        StagedBackbone("tf_efficientnet_lite0", stage_indices=[1, 2, 3], final_features=True)


def test_final_features_weights_load_from_a_timm_file(tmp_path) -> None:
    """conv_head and bn2 are part of the network now: a weights file's values reach them."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("tf_efficientnet_lite0")
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    staged = StagedBackbone("tf_efficientnet_lite0", pretrained=str(path), final_features=True)
    assert torch.equal(staged.model.conv_head.weight, source.conv_head.weight)
