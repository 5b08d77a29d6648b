"""Fine-tuning policies that keep what a pretrained backbone knows.

Not part of the paper's recipe; each is a switch of the training engine, off by default:

- :func:`imprint_classifiers` (``--model.head_init imprint``): before the first step, every
  classifier's last linear layer is set to the nearest-class-mean classifier of its own input
  features (weight imprinting, Qi et al., CVPR 2018, on centred features as in SimpleShot,
  Wang et al., 2019). A randomly initialised head starts at chance and, with few steps,
  pulls the combined prediction below what the pretrained features already separate; an
  imprinted head starts where a nearest-class-mean classifier on those features is.
- :func:`init_head_paths` (``--model.head_path_init identity``): before imprinting, the layers
  between a stage's map and its classifier (the projection ``Conv_layer`` and the head's
  hidden layer) start as close to the identity on what the backbone knows as their shapes
  allow: the projection keeps the span of the stage's class means (as +/- pairs, so that its
  ReLU drops no sign) and every BatchNorm on the way starts as the identity on the training
  images. A random projection and hidden layer otherwise scramble the pretrained features
  before the imprinted classifier reads them (on cub100 with one photo per class the
  stage-5 head's nearest class mean falls from 50.6% to 41.1%, EXPERIMENTS.md).
- :class:`SuppressionWarmup` (``--model.suppression_warmup_epochs``): CRAM's suppression
  factor omega rises from 1 (no suppression) to its configured value over the first epochs,
  so the later pretrained stages meet the suppressed maps gradually instead of at the first
  step. After the warm-up the network computes the paper's equations unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crasmra.model import PLAIN, CRASMRANet

__all__ = [
    "COMBINES",
    "FALLBACK_LOGIT_SCALE",
    "HEAD_INITS",
    "HEAD_PATH_INITS",
    "ImprintReport",
    "SuppressionWarmup",
    "calibrate_batchnorm",
    "centred_directions",
    "classifier_layers",
    "fit_head_weights",
    "fit_logit_scale",
    "imprint_classifiers",
    "imprint_linear",
    "init_head_paths",
    "leave_one_out_logits",
]

#: ``--model.head_init`` values: PyTorch's default initialisation, or weight imprinting.
HEAD_INITS: tuple[str, ...] = ("random", "imprint")
#: ``--model.head_path_init`` values: PyTorch's initialisation of the projection and the
#: heads' hidden layers, or the identity on the training images' features (:func:`init_head_paths`).
HEAD_PATH_INITS: tuple[str, ...] = ("random", "identity")
#: ``--model.combine`` values: the paper's mean of the softmaxes, or fitted head weights.
COMBINES: tuple[str, ...] = ("mean", "fitted")


def classifier_layers(net: CRASMRANet) -> dict[str, nn.Linear]:
    """The last linear layer of every head, by head name (:attr:`CRASMRANet.head_names`)."""
    if net.variant == PLAIN:
        classifier = net.backbone.model.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(
                f"head_init 'imprint' needs a linear classifier; {net.config['backbone']}'s is "
                f"{type(classifier).__name__}. Use --model.head_init random."
            )
        return {net.head_names[0]: classifier}
    layers = [head.mlp[-1] for head in net.heads] + [net.concat_head.mlp[-1]]
    return dict(zip(net.head_names, layers, strict=True))


def _added_batchnorms(net: CRASMRANet) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers of the modules added to the backbone (attention and heads)."""
    modules: list[nn.Module] = [*net.attention, *net.heads]
    if net.concat_head is not None:
        modules.append(net.concat_head)
    return [
        m for module in modules for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def calibrate_batchnorm(
    net: CRASMRANet, batches: Callable[[], Iterable[Tensor]]
) -> int:
    """Set the running statistics of the added modules' BatchNorm layers to the data's.

    Freshly initialised, their running mean and variance are 0 and 1, so in eval mode they
    do not normalise at all while in training mode they normalise with the batch's
    statistics: features computed in eval mode would not be the features training sees. One
    pass over ``batches`` in training mode with a cumulative average (``momentum=None``)
    gives them the population statistics; the backbone's BatchNorm layers stay in eval mode
    and keep theirs.

    Args:
        net: The network.
        batches: Returns an iterable of image batches (B, 3, H, W) on the network's device.

    Returns:
        The number of images seen.
    """
    norms = _added_batchnorms(net)
    if not norms:
        return 0
    was_training = net.training
    momenta = [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.train()
    seen = 0
    try:
        for images in batches():
            net(images)
            seen += images.shape[0]
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)
    return seen


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

    def class_mean_directions(self, limit: int) -> Tensor:
        """(r, D) orthonormal basis of the centred class means' span, r <= ``limit``."""
        present = self.class_counts > 0
        means = self.class_sums[present] / self.class_counts[present].unsqueeze(1)
        centred = means - means.mean(dim=0)
        if centred.shape[0] < 2:
            return centred.new_zeros(0, centred.shape[1])
        _, values, basis = torch.linalg.svd(centred, full_matrices=False)
        rank = int((values > values[0] * 1e-6).sum()) if values[0] > 0 else 0
        return basis[: min(rank, limit)]


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
        f"{getattr(attention, 'conv_layer', None)!r}. Use --model.conv_layer light or "
        "--model.head_path_init random."
    )


@torch.no_grad()
def init_head_paths(
    net: CRASMRANet,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    num_classes: int,
) -> dict[str, int]:
    """Start every head's path as close to the identity on the training features as it can.

    Two passes over ``batches`` in eval mode (the backbone's statistics as loaded):

    1. Each attended stage's projection (the 1x1 conv of the light ``Conv_layer``, C -> C_a)
       becomes ``[U; -U; 0]``, U the r orthonormal directions spanned by the centred class
       means of the conv's input (its spatial average; r <= C_a / 2), so that the projected
       map keeps what separates the class means and its ReLU drops no sign. Its BatchNorm
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

    Returns:
        Per stage and head, the number of class-mean directions kept.
    """
    if net.variant == PLAIN:
        raise ValueError(
            "head_path_init 'identity' initialises the paper variants' projections and heads; "
            "the plain variant has none. Use --model.head_path_init random."
        )
    projections = [
        _light_projection(attention, stage)
        for attention, stage in zip(net.attention, net.stage_names, strict=True)
    ]
    was_training = net.training
    net.eval()
    kept: dict[str, int] = {}
    try:
        # Pass 1: the conv inputs' class means (spatial averages) and pixel moments.
        pixel_moments = [_Moments(num_classes, conv.in_channels) for conv, _ in projections]
        pooled_moments = [_Moments(num_classes, conv.in_channels) for conv, _ in projections]

        def record_stage(i: int, x: Tensor, y: Tensor) -> None:
            pixel_moments[i].add(x.flatten(2).transpose(1, 2).flatten(0, 1))  # (B*H*W, C)
            pooled_moments[i].add(x.mean(dim=(2, 3)), y)  # (B, C)

        _run_with_hooks(net, batches, [conv for conv, _ in projections], record_stage)
        for stage, (conv, norm), moments, pooled in zip(
            net.stage_names, projections, pixel_moments, pooled_moments, strict=True
        ):
            basis = pooled.class_mean_directions(conv.out_channels // 2)
            weight = _pm_rows(basis, conv.out_channels)  # (C_a, C)
            conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight))
            # Per projected channel j: mean w_j . mu and variance w_j^T Sigma w_j of the pixels.
            _identity_batchnorm(
                norm,
                weight @ moments.mean(),
                ((weight @ moments.covariance()) * weight).sum(dim=1),
            )
            kept[f"{stage} projection"] = basis.shape[0]
        # Pass 2: the heads' pooled inputs.
        heads = [*net.heads, net.concat_head]
        head_moments = [_Moments(num_classes, head.mlp[0].num_features) for head in heads]
        _run_with_hooks(
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
            else:
                basis = moments.class_mean_directions(hidden.out_features // 2)
                weight = _pm_rows(basis, hidden.out_features)  # (H, D)
                kept[f"{name} head"] = basis.shape[0]
            hidden.weight.copy_(weight.to(hidden.weight))
            if hidden.bias is not None:
                hidden.bias.zero_()
            _identity_batchnorm(
                second_norm, weight @ mean, ((weight @ covariance) * weight).sum(dim=1)
            )
    finally:
        net.train(was_training)
    return kept


def _run_with_hooks(
    net: CRASMRANet,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    modules: Sequence[nn.Module],
    record: Callable[[int, Tensor, Tensor], object],
) -> None:
    """Run ``net`` over ``batches`` and call ``record(i, input of modules[i], labels)``."""
    captured: dict[int, Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0].detach().float())
        )
        for i, module in enumerate(modules)
    ]
    try:
        for images, target in batches():
            captured.clear()
            net(images)
            target = target.cpu()
            for i in range(len(modules)):
                record(i, captured[i], target)
    finally:
        for hook in hooks:
            hook.remove()


def centred_directions(
    class_means: Tensor, center: Tensor, present: Tensor | None = None
) -> Tensor:
    """(K, D) unit vectors from ``center`` to each class mean; zero rows for absent classes.

    Args:
        class_means: (K, D) mean feature per class.
        center: (D,) the centre (the mean of the class means).
        present: (K,) bool, the classes that had samples; None: all.
    """
    directions = F.normalize(class_means - center, dim=1)
    if present is not None:
        directions = directions * present.unsqueeze(1).to(directions)
    return directions


def imprint_linear(
    layer: nn.Linear,
    class_means: Tensor,
    center: Tensor,
    scale: float,
    present: Tensor | None = None,
) -> None:
    """Make ``layer`` the cosine nearest-class-mean classifier of centred features.

    ``W_k = scale * (m_k - c) / ||m_k - c||`` and ``b_k = -W_k . c``, so that
    ``layer(h) = scale * ||h - c|| * cos(h - c, m_k - c)``: its argmax is the class whose
    centred mean is nearest in angle.

    Args:
        layer: A (K, D) linear layer.
        class_means: (K, D) mean feature per class.
        center: (D,) the centre subtracted from every feature (the mean of the class means).
        scale: Multiplies the weights; the logits' scale is ``scale`` times the features'
            centred norm.
        present: (K,) bool, the classes that had samples; the others get zero weights and
            bias (logit 0). None: all.
    """
    weight = scale * centred_directions(class_means, center, present)  # (K, D)
    layer.weight.copy_(weight.to(layer.weight))
    if layer.bias is not None:
        layer.bias.copy_((-(weight @ center)).to(layer.bias))


@dataclass(frozen=True)
class ImprintReport:
    """What :func:`imprint_classifiers` did, per head.

    Attributes:
        train_accuracy: Nearest-class-mean accuracy on the imprinting images themselves.
        logit_scale: The logits' scale set (fitted or given).
        loo_probs: Per head, (M, K) softmax of the imprinted logits of the M images whose
            class has another image, each with its own class mean left out.
        loo_labels: (M,) their classes.
    """

    train_accuracy: dict[str, float]
    logit_scale: dict[str, float]
    loo_probs: dict[str, Tensor] = field(default_factory=dict)
    loo_labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def describe(self) -> str:
        """One line for the log."""
        return ", ".join(
            f"{name} {100 * acc:.1f}% (scale {self.logit_scale[name]:.3g})"
            for name, acc in self.train_accuracy.items()
        )


@torch.no_grad()
def imprint_classifiers(
    net: CRASMRANet,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    num_classes: int,
    logit_scale: float | None = None,
    centered: bool = True,
    calibrate: bool = True,
) -> ImprintReport:
    """Imprint every head's last linear layer with the class means of its own input features.

    The added modules' BatchNorm statistics are first calibrated on the data
    (:func:`calibrate_batchnorm`); then, in eval mode, the input of each head's last linear
    layer is averaged per class, and the layer becomes the cosine nearest-class-mean
    classifier of those features, centred on the mean of the class means
    (:func:`imprint_linear`). Its weights are scaled so that the logits of a feature of
    average norm span ``logit_scale`` times the cosine. With ``logit_scale=None`` the scale is
    fitted per head to the images' leave-one-out cross-entropy (:func:`fit_logit_scale`):
    each head starts calibrated, so a weak head's flat softmax cannot drag the mean of the
    softmaxes (the combined prediction) below the strong heads.

    Args:
        net: The network (any variant).
        batches: Returns an iterable of (images, labels) batches on the network's device;
            called once per pass (two passes for the paper's variants, one for ``plain``).
        num_classes: K.
        logit_scale: The logits' scale for a feature of average centred norm; None fits it
            per head (falling back to :data:`FALLBACK_LOGIT_SCALE` when every class has a
            single image).
        centered: Centre the features on the mean of the class means (SimpleShot's CL2N);
            False imprints the plain cosine classifier of the class means.
        calibrate: Calibrate the added BatchNorm layers first; False keeps their statistics
            (after :func:`init_head_paths`, which sets them).

    Returns:
        Per head, the nearest-class-mean accuracy on the imprinting data itself (a check
        that the features separate the classes, not a validation figure) and the scale used.
    """
    if calibrate and net.variant != PLAIN:
        calibrate_batchnorm(net, lambda: (images for images, _ in batches()))
    layers = classifier_layers(net)
    was_training = net.training
    net.eval()
    captured: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: captured.__setitem__(name, args[0].detach().float())
        )
        for name, layer in layers.items()
    ]
    sums = {name: torch.zeros(num_classes, layer.in_features) for name, layer in layers.items()}
    counts = torch.zeros(num_classes)
    features: dict[str, list[Tensor]] = {name: [] for name in layers}
    labels: list[Tensor] = []
    try:
        for images, target in batches():
            net(images)
            target = target.cpu()
            counts += torch.bincount(target, minlength=num_classes).float()
            labels.append(target)
            for name in layers:
                h = captured[name].cpu()  # (B, D)
                sums[name].index_add_(0, target, h)
                features[name].append(h)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    if counts.sum() == 0:
        raise ValueError("head_init 'imprint' found no training images to imprint from.")
    present = counts > 0
    y = torch.cat(labels)
    train_accuracy: dict[str, float] = {}
    scales: dict[str, float] = {}
    loo_probs: dict[str, Tensor] = {}
    loo_labels = torch.zeros(0, dtype=torch.long)
    for name, layer in layers.items():
        means = sums[name] / counts.clamp(min=1).unsqueeze(1)  # (K, D)
        center = means[present].mean(dim=0) if centered else means.new_zeros(means.shape[1])
        h = torch.cat(features[name])  # (N, D)
        directions = centred_directions(means, center, present)
        cosine = F.normalize(h - center, dim=1) @ directions.T  # (N, K)
        train_accuracy[name] = float((cosine.argmax(dim=1) == y).float().mean())
        # W = (scale / mean centred norm) * direction: the logits of a feature of average
        # norm span `scale` times the cosine.
        mean_norm = float((h - center).norm(dim=1).mean())
        loo = leave_one_out_logits(h, y, sums[name], counts, center)
        if logit_scale is None:
            scale = fit_logit_scale(loo, y, mean_norm, FALLBACK_LOGIT_SCALE)
        else:
            scale = float(logit_scale)
        if mean_norm > 0:
            loo_probs[name] = (scale * loo[0] / mean_norm).softmax(dim=1)
            loo_labels = y[loo[1]]
        weight_scale = scale / mean_norm if mean_norm > 0 and math.isfinite(mean_norm) else 0.0
        imprint_linear(layer, means, center, weight_scale, present)
        scales[name] = scale
    return ImprintReport(train_accuracy, scales, loo_probs, loo_labels)


#: The logits' scale when it cannot be fitted (every class has a single training image).
FALLBACK_LOGIT_SCALE = 10.0
#: Scales tried by :func:`fit_logit_scale` (log-spaced).
_SCALE_GRID = torch.logspace(-1, 2, 61)


def leave_one_out_logits(
    features: Tensor, labels: Tensor, sums: Tensor, counts: Tensor, center: Tensor
) -> tuple[Tensor, Tensor]:
    """Each image's unit-scale imprinted logits with its own class mean left out.

    The imprinted classifier classifies its own training images almost perfectly (each image
    pulls its class mean towards itself), so a scale fitted on them would be far too
    confident. With the image left out of its own class's mean, the logits are those of an
    unseen image of the class.

    Args:
        features: (N, D) features.
        labels: (N,) classes.
        sums: (K, D) per-class sums of the features.
        counts: (K,) images per class.
        center: (D,) the centre of the imprinted classifier.

    Returns:
        ``(logits, kept)``: (M, K) logits ``||h - c|| * cos(h - c, m_k - c)`` of the M images
        whose class has at least two images, and the (N,) bool mask of those images.
    """
    kept = counts[labels] >= 2
    h, y = features[kept], labels[kept]
    means = sums / counts.clamp(min=1).unsqueeze(1)
    directions = centred_directions(means, center, counts > 0)  # (K, D)
    centred = h - center
    logits = centred @ directions.T  # (M, K): ||h - c|| * cos
    own = (sums[y] - h) / (counts[y] - 1).unsqueeze(1)  # (M, D) own class mean without h
    own_direction = F.normalize(own - center, dim=1)
    logits[torch.arange(len(y)), y] = (centred * own_direction).sum(dim=1)
    return logits, kept


def fit_logit_scale(
    loo: tuple[Tensor, Tensor], labels: Tensor, mean_norm: float, fallback: float
) -> float:
    """The scale s minimising the cross-entropy of ``s * logits / mean_norm`` (a grid search).

    A calibrated head is the point: averaging softmaxes (the combined prediction) then gives a
    head as much say as its confidence is worth, and a weak head's flat softmax cannot
    outvote a strong one.

    Args:
        loo: :func:`leave_one_out_logits`.
        labels: (N,) classes of all images.
        mean_norm: The mean centred feature norm the imprinted weights divide by.
        fallback: Returned when no image has a left-out logit.
    """
    logits, kept = loo
    if logits.shape[0] == 0 or not mean_norm > 0:
        return float(fallback)
    y = labels[kept]
    losses = torch.stack([F.cross_entropy(s * logits / mean_norm, y) for s in _SCALE_GRID])
    return float(_SCALE_GRID[int(losses.argmin())])


def fit_head_weights(
    probs: dict[str, Tensor],
    labels: Tensor,
    iterations: int = 200,
    fallback: Sequence[float] | None = None,
) -> list[float]:
    """Mixture weights of the heads that maximise the likelihood of held-out predictions.

    The combined prediction ``sum_h w_h p_h`` is a mixture of the heads' softmaxes; its
    log-likelihood is concave in ``w`` on the simplex, and the EM update
    ``w_h <- mean_i w_h p_h(y_i | x_i) / sum_g w_g p_g(y_i | x_i)`` climbs to its maximum.
    Fitted on leave-one-out predictions (:class:`ImprintReport`), a head that separates
    the classes poorly gets a small weight.

    Args:
        probs: Per head, (M, K) probabilities of M held-out images (in head order).
        labels: (M,) their classes.
        iterations: EM steps.
        fallback: The weights when there is nothing to fit on (every class has a single
            image); None gives equal weights.

    Returns:
        One weight per head of ``probs``, in its order, summing to 1.
    """
    names = list(probs)
    if not names:
        return []
    if labels.numel() == 0:
        if fallback is not None:
            total = float(sum(fallback))
            return [float(w) / total for w in fallback]
        return [1.0 / len(names)] * len(names)
    rows = torch.arange(labels.numel())
    # (H, M): each head's probability of the true class, floored so that no image has none.
    likelihood = torch.stack([probs[n][rows, labels].double() for n in names]).clamp(min=1e-12)
    weights = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    for _ in range(iterations):
        joint = weights.unsqueeze(1) * likelihood  # (H, M)
        weights = (joint / joint.sum(dim=0, keepdim=True)).mean(dim=1)
    return [float(w) for w in weights / weights.sum()]


@dataclass(frozen=True)
class SuppressionWarmup:
    """CRAM's omega brought in gradually: 1 at step 0, ``omega`` from ``steps`` on.

    ``omega_t = 1 - (1 - omega) * min(1, t / steps)``: the mask first multiplies nothing,
    then its suppression deepens linearly to the configured factor.

    Attributes:
        omega: The configured suppression factor (the paper's 0.5).
        steps: Length of the warm-up in optimiser steps (0: no warm-up).
    """

    omega: float
    steps: int

    def omega_at(self, step: int) -> float:
        """The suppression factor in force at optimiser step ``step``."""
        if self.steps <= 0:
            return self.omega
        progress = min(1.0, max(0, step) / self.steps)
        return 1.0 - (1.0 - self.omega) * progress

    def apply(self, net: CRASMRANet, step: int) -> float:
        """Set omega of every attention module that has one; return the value set."""
        value = self.omega_at(step)
        for module in net.attention:
            if hasattr(module, "omega"):
                module.omega = value
        return value
