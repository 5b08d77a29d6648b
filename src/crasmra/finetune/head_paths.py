"""Head-path initialisation (``--model.finetune.head_path_init identity``): the projection
and the heads' hidden layers start as close to the identity on the training features as their
shapes allow."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from crasmra.finetune.capture import run_capturing_inputs
from crasmra.finetune.choices import HEAD_PATH_DIRECTIONS
from crasmra.model import Network

__all__ = ["HeadPaths", "init_head_paths"]


@dataclass(frozen=True)
class HeadPaths:
    """What :func:`init_head_paths` set, per stage projection and head.

    Attributes:
        kept: ``{"<stage> projection" | "<head> head": r}``, the number of directions each
            projection and hidden layer kept (the class means' span, then with ``principal``
            the leading principal directions outside it; a square hidden layer, set to the
            identity, keeps its width).
        signed_pairs: ``{head name: r}`` for every head of :attr:`Network.head_names`: the
            input of its classifier begins with ``r`` features ``relu(z)``, then their ``r``
            mirrors ``relu(-z)``, then zeros. For a stage head whose hidden layer is square,
            ``z`` is the projection of the stage's pixels onto its projection's directions,
            averaged by the pooling after the ReLU; for a head whose hidden layer is
            ``[U; -U; 0]`` (the concat head), ``z = U h`` through the ELU. A head without that
            layout (a square concat head) has 0. ``--model.finetune.imprint_signed`` fits the
            classifiers on ``relu(z) - relu(-z)`` (:func:`crasmra.finetune.imprint_classifiers`).
    """

    kept: dict[str, int] = field(default_factory=dict)
    signed_pairs: dict[str, int] = field(default_factory=dict)


class _Moments:
    """Running class sums, sum and sum of outer products of (N, D) features."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.class_sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.class_counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def add(self, rows: Tensor, labels: Tensor | None = None) -> None:
        rows = rows.detach().double().cpu()
        self.sum += rows.sum(dim=0)
        self.outer += rows.T @ rows
        self.count += rows.shape[0]
        if labels is not None:
            self.class_sums.index_add_(0, labels, rows)
            self.class_counts += torch.bincount(labels, minlength=len(self.class_counts))

    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    def covariance(self) -> Tensor:
        mean = self.mean()
        return self.outer / max(self.count, 1) - torch.outer(mean, mean)

    def class_mean_directions(self, limit: int, centred: bool = True) -> Tensor:
        """(r, D) orthonormal basis of the class means' span, r <= ``limit``: of the means
        centred on their mean (at most K - 1 directions), or of the means themselves
        (``centred=False``, at most K)."""
        present = self.class_counts > 0
        means = self.class_sums[present] / self.class_counts[present].unsqueeze(1)
        if centred:
            means = means - means.mean(dim=0)
            if means.shape[0] < 2:
                return means.new_zeros(0, means.shape[1])
        _, values, basis = torch.linalg.svd(means, full_matrices=False)
        rank = int((values > values[0] * 1e-6).sum()) if values[0] > 0 else 0
        return basis[: min(rank, limit)]

    def leading_directions(self, limit: int, principal: bool, centred: bool = True) -> Tensor:
        """(r, D) orthonormal: the class means' span (centred or not, as
        :meth:`class_mean_directions`), then (with ``principal``) the leading principal
        directions of the features' variance outside it, r <= ``limit``.

        With K classes the centred class means span at most K - 1 directions: with 10
        classes a head would read 9 of a 1280-d map. The principal directions fill the rest
        of the ``limit`` with what varies most within the classes.
        """
        means = self.class_mean_directions(limit, centred)
        if not principal or means.shape[0] >= limit:
            return means
        # The covariance with the class means' span projected out: (D, D).
        outside = torch.eye(means.shape[1], dtype=means.dtype) - means.T @ means
        rest = outside @ self.covariance() @ outside
        values, vectors = torch.linalg.eigh((rest + rest.T) / 2)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        if values[0] <= 0:
            return means
        count = min(int((values > values[0] * 1e-6).sum()), limit - means.shape[0])
        return torch.cat([means, vectors[:, :count].T])


def _pm_rows(basis: Tensor, rows: int) -> Tensor:
    """(rows, D): ``basis`` and its negation, then zeros (``2 * len(basis) <= rows``).

    A ReLU after ``[U; -U] x`` keeps both signs of ``U x``: ``relu(z) - relu(-z) = z``.
    """
    out = basis.new_zeros(rows, basis.shape[1])
    r = basis.shape[0]
    out[:r], out[r : 2 * r] = basis, -basis
    return out


@torch.no_grad()
def _identity_batchnorm(norm: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor) -> None:
    """Give ``norm`` the data's statistics and the affine map that undoes them (eval: y = x)."""
    var = var.clamp(min=0)
    norm.running_mean.copy_(mean.to(norm.running_mean))
    norm.running_var.copy_(var.to(norm.running_var))
    norm.num_batches_tracked.zero_()
    if norm.affine:
        norm.weight.copy_((var + norm.eps).sqrt().to(norm.weight))
        norm.bias.copy_(mean.to(norm.bias))


def _light_projection(attention: nn.Module, stage: str) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """The 1x1 conv and BatchNorm of a ``"light"`` Conv_layer, or a ValueError."""
    layers = list(getattr(attention, "conv_layer", ()))
    if (
        len(layers) == 3
        and isinstance(layers[0], nn.Conv2d)
        and layers[0].kernel_size == (1, 1)
        and layers[0].groups == 1
        and isinstance(layers[1], nn.BatchNorm2d)
        and isinstance(layers[2], nn.ReLU)
    ):
        return layers[0], layers[1]
    raise ValueError(
        f"head_path_init 'identity' needs the light Conv_layer (1x1 conv, BN, ReLU) after "
        f"{stage}; this network's is {type(attention).__name__}.conv_layer = "
        f"{getattr(attention, 'conv_layer', None)!r}. Use --model.net.conv_layer light or "
        "--model.finetune.head_path_init random."
    )


@torch.no_grad()
def init_head_paths(
    net: Network,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    num_classes: int,
    directions: Literal["class_means", "principal"] = "class_means",
    centred: bool = True,
) -> HeadPaths:
    """Start every head's path as close to the identity on the training features as it can.

    Two passes over ``batches`` in eval mode (the backbone's statistics as loaded):

    1. Each attended stage's projection (the 1x1 conv of the light ``Conv_layer``, C -> C_a)
       becomes ``[U; -U; 0]``, U the r orthonormal directions spanned by the (by default
       centred) class means of the conv's input (its spatial average; r <= C_a / 2), so that
       the projected map keeps what separates the class means and its ReLU drops no sign. With
       ``directions="principal"`` U goes on with the leading principal directions of the
       spatial averages outside the class means' span, up to C_a / 2. Its BatchNorm
       gets the projected pixels' statistics and the scale and shift that undo them.
    2. Each head's first BatchNorm becomes the identity on its pooled input; its hidden
       linear layer the identity when it is square (the stage heads: C_a -> C_a), else
       ``[U; -U; 0]`` of the pooled input's class means (the concat head: n * C_a -> hidden);
       the BatchNorm after it the identity on that layer's output. The ELU that follows is
       the identity on the stage heads' non-negative pooled features.

    The classifier (the last linear layer) is left to :func:`imprint_classifiers`, to be
    called next with ``calibrate=False``.

    Args:
        net: A network of a paper variant (not ``"plain"``) with the light Conv_layer.
        batches: Returns an iterable of (images, labels) batches on the network's device.
        num_classes: K.
        directions: ``"class_means"``: U spans the class means only (at most K - 1
            directions); ``"principal"``: then the leading principal directions of the rest.
        centred: U spans the class means centred on their mean (at most K - 1 directions,
            what the centred imprint reads: ``--model.finetune.imprint_centered true``);
            False: the class means themselves (at most K, their mean's direction included),
            so that the uncentred imprint (``imprint_centered false``) is exactly the cosine
            nearest class mean of the stage's pooled map.

    Returns:
        Per stage and head, the directions kept, and per head the ``+/-`` pairs
        its classifier's input starts with.
    """
    if directions not in HEAD_PATH_DIRECTIONS:
        raise ValueError(f"directions must be one of {HEAD_PATH_DIRECTIONS}, got {directions!r}")
    principal = directions == "principal"
    if not net.attention:
        raise ValueError(
            "head_path_init 'identity' initialises the paper variants' projections and heads; "
            "the plain variant has none. Use --model.finetune.head_path_init random."
        )
    projections = [
        _light_projection(attention, stage)
        for attention, stage in zip(net.attention, net.stage_names, strict=True)
    ]
    was_training = net.training
    net.eval()
    kept: dict[str, int] = {}
    pairs: dict[str, int] = {}
    # Per stage, the pairs its projection [U; -U; 0] gives the stage head.
    projection_pairs: dict[str, int] = {}
    try:
        # Pass 1: the conv inputs' class means (spatial averages) and pixel moments.
        pixel_moments = [_Moments(num_classes, conv.in_channels) for conv, _ in projections]
        pooled_moments = [_Moments(num_classes, conv.in_channels) for conv, _ in projections]

        def record_stage(i: int, x: Tensor, y: Tensor) -> None:
            pixel_moments[i].add(x.flatten(2).transpose(1, 2).flatten(0, 1))  # (B*H*W, C)
            pooled_moments[i].add(x.mean(dim=(2, 3)), y)  # (B, C)

        run_capturing_inputs(net, batches, [conv for conv, _ in projections], record_stage)
        for stage, (conv, norm), moments, pooled in zip(
            net.stage_names, projections, pixel_moments, pooled_moments, strict=True
        ):
            basis = pooled.leading_directions(conv.out_channels // 2, principal, centred)
            weight = _pm_rows(basis, conv.out_channels)  # (C_a, C)
            conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight))
            # Per projected channel j: mean w_j . mu and variance w_j^T Sigma w_j of the pixels.
            _identity_batchnorm(
                norm,
                weight @ moments.mean(),
                ((weight @ moments.covariance()) * weight).sum(dim=1),
            )
            kept[f"{stage} projection"] = projection_pairs[stage] = basis.shape[0]
        # Pass 2: the heads' pooled inputs.
        heads = [*net.heads, net.concat_head]
        head_moments = [_Moments(num_classes, head.mlp[0].num_features) for head in heads]
        run_capturing_inputs(
            net, batches,
            [head.mlp[0] for head in heads],
            lambda i, x, y: head_moments[i].add(x, y),
        )
        for name, head, moments in zip(net.head_names, heads, head_moments, strict=True):
            first_norm, hidden, second_norm = head.mlp[0], head.mlp[1], head.mlp[2]
            covariance, mean = moments.covariance(), moments.mean()
            _identity_batchnorm(first_norm, mean, covariance.diagonal())
            if hidden.in_features == hidden.out_features:
                weight = torch.eye(hidden.out_features, dtype=torch.float64)
                kept[f"{name} head"] = hidden.out_features
                # The identity passes the pairs of the stage's projection through; the input
                # of a square concat head is the stages' blocks of pairs side by side, no
                # single block of pairs.
                pairs[name] = projection_pairs.get(name, 0)
            else:
                basis = moments.leading_directions(hidden.out_features // 2, principal, centred)
                weight = _pm_rows(basis, hidden.out_features)  # (H, D)
                kept[f"{name} head"] = pairs[name] = basis.shape[0]
            hidden.weight.copy_(weight.to(hidden.weight))
            if hidden.bias is not None:
                hidden.bias.zero_()
            _identity_batchnorm(
                second_norm, weight @ mean, ((weight @ covariance) * weight).sum(dim=1)
            )
    finally:
        net.train(was_training)
    return HeadPaths(kept=kept, signed_pairs=pairs)

