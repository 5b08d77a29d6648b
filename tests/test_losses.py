"""CRASMRALoss: the weighted sum and its named parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crasmra import CRASMRALoss, ModelOutput
from crasmra.losses import diversity_loss


def _output(batch: int = 4, classes: int = 5) -> ModelOutput:
    torch.manual_seed(0)
    logits = [torch.randn(batch, classes, requires_grad=True) for _ in range(4)]
    return ModelOutput(
        stage_logits=tuple(logits[:3]),
        concat_logits=logits[3],
        features=(),
        stage_names=("stage3", "stage4", "stage5"),
    )


def test_total_is_the_weighted_sum_of_named_parts() -> None:
    out, target = _output(), torch.tensor([0, 1, 2, 3])
    div = torch.tensor(0.25, requires_grad=True)
    loss = CRASMRALoss(alpha=2.0, beta=0.5, gamma=3.0)
    total, parts = loss(out, target, div)
    assert list(parts) == ["stage3_ce", "stage4_ce", "stage5_ce", "concat_ce", "diversity"]
    stage = [F.cross_entropy(lg, target) for lg in out.stage_logits]
    expected = 2.0 * sum(stage) + 0.5 * F.cross_entropy(out.concat_logits, target) + 3.0 * 0.25
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["stage4_ce"], stage[1].detach())
    assert all(not p.requires_grad for p in parts.values())
    total.backward()
    assert div.grad is not None and div.grad.item() == pytest.approx(3.0)
    assert all(lg.grad is not None for lg in out.logits)


def test_without_div_loss_there_is_no_diversity_term() -> None:
    total, parts = CRASMRALoss()(_output(), torch.tensor([0, 1, 2, 3]))
    assert "diversity" not in parts
    expected = 2.0 * sum(parts[f"stage{i}_ce"] for i in (3, 4, 5)) + parts["concat_ce"]
    torch.testing.assert_close(total.detach(), expected)


def test_defaults_and_validation() -> None:
    loss = CRASMRALoss()
    assert (loss.alpha, loss.beta, loss.gamma) == (2.0, 1.0, 1.0)
    for kwargs in (dict(alpha=-1.0), dict(beta=-0.1), dict(gamma=-2.0)):
        (name,) = kwargs
        with pytest.raises(ValueError, match=f"^{name} must be non-negative"):
            CRASMRALoss(**kwargs)


def test_diversity_loss_is_one_minus_the_mean_peak_coverage() -> None:
    """L_div = 1 - (1/eps) sum_j max_s A[s, j]: two stages on two positions."""
    attention = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]).view(1, 2, 1, 2)
    # peaks 1.0 and 0.5 -> h = 1.5 / 2
    torch.testing.assert_close(diversity_loss(attention), torch.tensor(0.25))


def test_parts_are_named_by_position_without_stage_names() -> None:
    out = _output()
    out.stage_names = ()
    _, parts = CRASMRALoss()(out, torch.tensor([0, 1, 2, 3]))
    assert list(parts) == ["head0_ce", "head1_ce", "head2_ce", "concat_ce"]
