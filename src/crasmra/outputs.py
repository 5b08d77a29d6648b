"""What a network returns: the heads' logits and the maps they read.

Below the model and the losses, so that both (and every consumer) import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PLAIN_HEAD", "ModelOutput"]

#: Name of the plain variant's one head (metrics ``classifier_top1``, export ``logits_classifier``).
PLAIN_HEAD = "classifier"


@dataclass
class ModelOutput:
    """What :class:`CRASMRANet` returns, in train and eval mode alike.

    The paper's variants fill ``stage_logits`` and ``concat_logits``; the ``"plain"`` variant
    fills only ``classifier_logits`` (``stage_logits`` is empty, ``concat_logits`` None).
    :attr:`logits`, :attr:`head_names` and :attr:`probs` read the same for both.

    Attributes:
        stage_logits: One (B, K) logit tensor per attended stage.
        concat_logits: (B, K) logits of the head on the concatenated pooled features (None
            for ``"plain"``).
        features: The (B, C_a, H_l, W_l) head-side maps x_e that SMRAM reads in training; for
            ``"plain"`` the one (B, C, h, w) map timm's head reads.
        stage_names: Names of the attended stages, e.g. ``("stage3", "stage4", "stage5")``
            (for ``"plain"`` the last stage's, naming ``features``).
        classifier_logits: (B, K) logits of timm's own classifier (``"plain"`` only).
        head_weights: Weights of the heads in the combined prediction, in the order of
            :attr:`logits`, summing to 1; None for the paper's equal weights.
    """

    stage_logits: tuple[Tensor, ...]
    concat_logits: Tensor | None
    features: tuple[Tensor, ...]
    stage_names: tuple[str, ...] = ()
    classifier_logits: Tensor | None = None
    head_weights: tuple[float, ...] | None = None

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of :attr:`logits`: stage names and ``"concat"``, or ``("classifier",)``."""
        if self.classifier_logits is not None:
            return (PLAIN_HEAD,)
        names = self.stage_names or tuple(f"head{i}" for i in range(len(self.stage_logits)))
        return (*names, "concat")

    @property
    def logits(self) -> tuple[Tensor, ...]:
        """All heads' logits: ``(*stage_logits, concat_logits)``, or ``(classifier_logits,)``."""
        if self.classifier_logits is not None:
            return (self.classifier_logits,)
        if self.concat_logits is None:
            raise ValueError("ModelOutput needs concat_logits or classifier_logits.")
        return (*self.stage_logits, self.concat_logits)

    @property
    def probs(self) -> Tensor:
        """The combined prediction, (B, K) float32: the paper's mean of every head's softmax,
        or their weighted mean with :attr:`head_weights`.

        For ``"plain"`` this is the softmax of its one classifier.
        """
        probs = [lg.float().softmax(dim=-1) for lg in self.logits]  # H x (B, K)
        if self.head_weights is None:
            return torch.stack(probs).mean(dim=0)
        # Python floats, not a tensor: a traced or exported graph keeps them as constants.
        return sum(w * p for w, p in zip(self.head_weights, probs, strict=True))
