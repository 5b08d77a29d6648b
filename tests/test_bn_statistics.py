"""benchmarks/bn_statistics.py: the BatchNorm inputs behind CRAM's mask."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from crasmra.model import create_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bn_statistics  # noqa: E402

SIZE = (64, 64)


def _net(variant: str = "cra-smra"):
    torch.manual_seed(0)
    return create_model(variant=variant, backbone="resnet10t", num_classes=3, pretrained=False,
                        head_channels=16, head_hidden=16).eval()


def test_batchnorms_are_split_by_the_attention_modules_in_running_order() -> None:
    net = _net()
    segments = bn_statistics.batchnorms(net, SIZE)
    assert len(segments) == len(net.attention)
    every = [m for seg in segments for m in seg]
    backbone = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(every) == len(set(map(id, every))) == len(backbone)
    # The first layer of segment 1 is the first to run on attention[0]'s output.
    first_after: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: first_after.append(m)) for m in every]
    seen_attention = []
    hooks.append(net.attention[0].register_forward_hook(
        lambda m, i, o: seen_attention.append(len(first_after))))
    with torch.no_grad():
        net(torch.zeros(1, 3, *SIZE))
    for h in hooks:
        h.remove()
    assert first_after[seen_attention[0]] is segments[1][0]
    assert first_after[: seen_attention[0]] == segments[0]


def test_the_mask_changes_only_what_runs_behind_it() -> None:
    net = _net()
    segments = bn_statistics.batchnorms(net, SIZE)
    every = [m for seg in segments for m in seg]
    torch.manual_seed(1)
    images = [torch.randn(4, 3, *SIZE) for _ in range(2)]
    masked = bn_statistics.moments(net, images, every)
    net.set_omega(1.0)
    unmasked = bn_statistics.moments(net, images, every)
    for m in segments[0]:
        assert torch.allclose(masked[m][1], unmasked[m][1])
    assert not torch.allclose(masked[segments[1][0]][1], unmasked[segments[1][0]][1])
    # baseline has no mask: omega changes nothing anywhere.
    plain = _net("baseline")
    assert plain.set_omega(1.0) == 0


def test_mismatch_is_zero_where_the_statistics_fit_and_log_scaled_where_not() -> None:
    bn = nn.BatchNorm2d(2, eps=0.0)
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    fit = {bn: (torch.tensor([1.0, -1.0]), torch.tensor([4.0, 1.0]))}
    assert bn_statistics.mismatch([bn], fit) == pytest.approx((0.0, 0.0))
    off = {bn: (torch.tensor([3.0, -1.0]), torch.tensor([16.0, 1.0]))}
    # shift: |3 - 1| / 2 = 1 and 0; scale: |log 4| and 0.
    assert bn_statistics.mismatch([bn], off) == pytest.approx((0.5, 0.5 * float(torch.log(
        torch.tensor(4.0)))))
