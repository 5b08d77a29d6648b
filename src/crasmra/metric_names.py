"""The names of heads and metrics, as training logs them and reports and sweeps read them.

A metric is named ``{split}/{head}_top{k}``: ``val/combined_top1`` is the combined
prediction's top-1 accuracy on the validation split. This module imports nothing, so sweeps
and reports can read metric files without importing torch or Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "COMBINED",
    "CONCAT",
    "MONITOR",
    "TEST_COMBINED_TOP1",
    "head_order",
    "heads_in",
    "metric_name",
]

#: The paper's test-time prediction: the mean of every head's softmax.
COMBINED = "combined"
#: The head on the concatenated stage features.
CONCAT = "concat"
#: The plain variant's one head (the same value as :data:`crasmra.outputs.PLAIN_HEAD`).
_PLAIN = "classifier"


def metric_name(split: str, head: str, k: int = 1) -> str:
    """``{split}/{head}_top{k}``: ``metric_name("test", COMBINED)`` is ``test/combined_top1``."""
    return f"{split}/{head}_top{k}"


#: Monitored quantity for model selection. Always a validation metric, never a test metric.
MONITOR = metric_name("val", COMBINED)
#: The figure sweeps compare and runs print: the combined prediction's test top-1.
TEST_COMBINED_TOP1 = metric_name("test", COMBINED)


def head_order(head: str) -> tuple[bool, bool, bool, str]:
    """Sort key of the paper's column order: stage heads, the plain classifier, concat, combined."""
    return head == COMBINED, head == CONCAT, head == _PLAIN, head


def heads_in(names: Iterable[str], split: str = "test") -> list[str]:
    """The heads with a top-1 metric of ``split`` among metric ``names``, in :func:`head_order`."""
    prefix, suffix = f"{split}/", "_top1"
    heads = {n[len(prefix):-len(suffix)] for n in names
             if n.startswith(prefix) and n.endswith(suffix)}
    return sorted(heads, key=head_order)
