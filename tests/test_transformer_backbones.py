"""Swin and plain ViTs as staged backbones: timm's own stage outputs, the map handed back,
other input sizes, weights at another size, the plain variant and the refusals."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from crasmra.backbones import TOKENS, StagedBackbone, check_backbone
from crasmra.backbones.families import token_stage_ends

#: (timm name, input size of the tests): random init, built at that size.
CASES = [
    ("swin_tiny_patch4_window7_224", 64),
    ("swinv2_tiny_window8_256", 64),
    ("vit_tiny_patch16_224", 64),
    ("deit_tiny_distilled_patch16_224", 64),
    ("eva02_tiny_patch14_224", 56),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _reference(name: str, size: int, ours: StagedBackbone, **kwargs: object) -> torch.nn.Module:
    """timm's own model at ``size`` with dynamic sizes, holding ``ours``' weights."""
    reference = timm.create_model(name, img_size=size, dynamic_img_size=True, **kwargs).eval()
    missing, unexpected = reference.load_state_dict(ours.model.state_dict(), strict=False)
    assert not unexpected
    # Only what the staged forward never calls is missing: the final norm and the head.
    assert all(k.startswith(("norm.", "head", "fc_norm.")) for k in missing), missing
    return reference


@pytest.mark.parametrize(("name", "size"), CASES)
def test_stage_maps_equal_timms_forward_intermediates(name: str, size: int) -> None:
    ours = StagedBackbone(name, img_size=size).eval()
    reference = _reference(name, size, ours)
    info = reference.feature_info
    assert ours.stage_channels == tuple(info[i]["num_chs"] for i in ours.stage_indices)
    assert ours.stage_reductions == tuple(info[i]["reduction"] for i in ours.stage_indices)
    expected = (5, 8, 11) if ours.family == TOKENS else (1, 2, 3)
    assert ours.stage_indices == expected == check_backbone(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got = ours(x)
        want = reference.forward_intermediates(
            x, indices=list(ours.stage_indices), intermediates_only=True
        )
    for g, w in zip(got, want, strict=True):
        assert g.dim() == 4 and g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_swin_reads_the_map_handed_back_in_its_own_layout() -> None:
    ours = StagedBackbone("swin_tiny_patch4_window7_224", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first, second, _ = ours(x, hook=lambda i, f: f * 0.5)
        # Stage 3 (layers.2) of timm's Swin reads (B, H, W, C).
        expected = ours.model.layers[2]((first * 0.5).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(second, expected)


def test_vit_reads_the_map_handed_back_behind_unchanged_prefix_tokens() -> None:
    name = "deit_tiny_distilled_patch16_224"  # two prefix tokens: class and distillation
    ours = StagedBackbone(name, img_size=32).eval()
    reference = _reference(name, 32, ours)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second, _ = ours(x, hook=lambda i, f: f * 0.5)
        # timm's own tokens after block 6 (index 5): prefix (B, 2, C) and patches (B, C, 2, 2).
        [(patches, prefix)] = reference.forward_intermediates(
            x, indices=[5], return_prefix_tokens=True, intermediates_only=True
        )
        tokens = torch.cat([prefix, (patches * 0.5).flatten(2).transpose(1, 2)], dim=1)
        for block in reference.blocks[6:9]:
            tokens = block(tokens)
    torch.testing.assert_close(first, patches)
    expected = tokens[:, 2:].transpose(1, 2).reshape(2, -1, 2, 2)
    torch.testing.assert_close(second, expected)


def test_vit_stage_indices_group_the_blocks_and_drop_the_rest() -> None:
    ours = StagedBackbone("vit_tiny_patch16_224", stage_indices=[1, 3, 5], img_size=32)
    assert ours.stage_names == ("stage2", "stage4", "stage6")
    assert all(isinstance(ours.model.blocks[i], torch.nn.Identity) for i in range(6, 12))
    assert isinstance(ours.model.norm, torch.nn.Identity)
    maps = ours(torch.randn(2, 3, 32, 32))
    sum(m.sum() for m in maps).backward()
    assert all(p.grad is not None for p in ours.parameters())
    assert token_stage_ends(12) == (5, 8, 11) and token_stage_ends(24) == (11, 17, 23)
    assert token_stage_ends(4) == (1, 2, 3) and token_stage_ends(3) == (0, 1, 2)


@pytest.mark.parametrize(
    ("name", "built", "sizes"),
    [
        ("swin_tiny_patch4_window7_224", 64, [(96, 64), (448, 448)]),
        ("vit_tiny_patch16_224", 32, [(64, 48), (40, 40)]),
    ],
)
def test_a_transformer_runs_at_other_sizes_than_it_was_built_for(
    name: str, built: int, sizes: list[tuple[int, int]]
) -> None:
    ours = StagedBackbone(name, img_size=built).eval()
    assert ours.data_config["input_size"] == (3, built, built)
    for h, w in sizes:
        with torch.no_grad():
            maps = ours(torch.randn(1, 3, h, w))
        for fmap, stride in zip(maps, ours.stage_reductions, strict=True):
            # A ViT pads an input that is not a multiple of its patches (40 px -> 3 patches).
            assert fmap.shape[-2:] == (-(-h // stride), -(-w // stride))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_weights_of_another_size_are_adapted_as_timm_adapts_them(tmp_path, name: str) -> None:
    source = timm.create_model(name)  # built for 224 px
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    ours = StagedBackbone(name, pretrained=str(path), img_size=64)
    torch.testing.assert_close(ours.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    if name.startswith("vit"):  # the 14x14 position embedding resampled to 4x4 (+ class token)
        assert ours.model.pos_embed.shape == (1, 17, 192) != source.pos_embed.shape
        torch.testing.assert_close(ours.model.pos_embed[:, 0], source.pos_embed[:, 0])


@pytest.mark.parametrize(("name", "size"), [CASES[0], CASES[2]])
def test_plain_runs_timms_own_forward(name: str, size: int) -> None:
    ours = StagedBackbone(name, num_classes=5, img_size=size).eval()
    reference = timm.create_model(name, num_classes=5, img_size=size, dynamic_img_size=True)
    reference.load_state_dict(ours.model.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = ours.forward_features(x)
        torch.testing.assert_close(ours.forward_head(features), reference.eval()(x))
    if ours.family != TOKENS:  # Swin's (B, h, w, C) map reaches Grad-CAM as (B, C, h, w)
        assert features.shape == (2, 768, size // 32, size // 32)


@pytest.mark.parametrize("name", ["maxvit_tiny_tf_224", "beit_base_patch16_224"])
def test_a_transformer_fixed_to_one_size_is_refused_with_what_to_use(name: str) -> None:
    with pytest.raises(ValueError, match=r"neither dynamic_img_size nor strict_img_size.*swin"):
        check_backbone(name)


def test_patch_dropout_is_refused() -> None:
    from crasmra.backbones.families import TokenSegments

    model = timm.create_model("vit_tiny_patch16_224", patch_drop_rate=0.5, img_size=32)
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        TokenSegments.check(model, "vit_tiny_patch16_224")


@pytest.mark.parametrize(("name", "size"), [CASES[0], CASES[2]])
def test_final_features_end_with_timms_final_norm(name: str, size: int) -> None:
    ours = StagedBackbone(name, final_features=True, img_size=size).eval()
    reference = timm.create_model(name, img_size=size, dynamic_img_size=True).eval()
    reference.load_state_dict(ours.model.state_dict(), strict=False)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        [want] = reference.forward_intermediates(
            x, indices=[ours.stage_indices[-1]], norm=True, intermediates_only=True
        )
        got = ours(x)
    torch.testing.assert_close(got[-1], want)
    assert not isinstance(ours.model.norm, torch.nn.Identity)
