"""Weight imprinting (``--model.finetune.head_init imprint``): every classifier starts as the
nearest-class-mean classifier of its own input features."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crasmra.finetune.capture import run_capturing_inputs
from crasmra.finetune.ncm import (
    FALLBACK_LOGIT_SCALE,
    centred_directions,
    fit_logit_scale,
    leave_one_out_logits,
)
from crasmra.finetune.probe import probe_linear
from crasmra.model import Network

__all__ = ["ImprintReport", "calibrate_batchnorm", "classifier_layers", "imprint_classifiers",
           "imprint_linear"]


def classifier_layers(net: Network) -> dict[str, nn.Linear]:
    """The last linear layer of every head, by head name (:attr:`Network.head_names`)."""
    layers = net.classifier_layers()
    for layer in layers.values():
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"head_init 'imprint' needs a linear classifier; {net.config['backbone']}'s is "
                f"{type(layer).__name__}. Use --model.finetune.head_init random."
            )
    return layers


def _added_batchnorms(net: Network) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers of the modules added to the backbone (attention and heads)."""
    return [
        m for module in net.added_modules() for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def calibrate_batchnorm(
    net: Network, batches: Callable[[], Iterable[Tensor]]
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


@torch.no_grad()
def _expand_signed(layer: nn.Linear, fitted: nn.Linear, pairs: int) -> None:
    """Give ``layer`` (K, D) the weights ``[W, -W, 0]`` of ``fitted`` (K, r), and its bias."""
    layer.weight.zero_()
    layer.weight[:, :pairs] = fitted.weight
    layer.weight[:, pairs : 2 * pairs] = -fitted.weight
    if layer.bias is not None:
        layer.bias.copy_(fitted.bias)


@dataclass(frozen=True)
class ImprintReport:
    """What :func:`imprint_classifiers` did, per head.

    Attributes:
        train_accuracy: Nearest-class-mean accuracy on the imprinting images themselves.
        logit_scale: The logits' scale set (fitted or given).
        loo_probs: Per head, (M, K) softmax of the imprinted logits of the M images whose
            class has another image, each with its own class mean left out.
        loo_labels: (M,) their classes.
        probe_decay: With ``probe``, per head, the weight decay of its logistic regression.
        probe_selection: With ``probe``, per head, how the decay was chosen (``"holdout"`` or
            ``"fixed"``, :func:`crasmra.finetune.probe.select_decay`).
    """

    train_accuracy: dict[str, float]
    logit_scale: dict[str, float]
    loo_probs: dict[str, Tensor] = field(default_factory=dict)
    loo_labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    probe_decay: dict[str, float] = field(default_factory=dict)
    probe_selection: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the log."""
        return ", ".join(
            f"{name} {100 * acc:.1f}% (scale {self.logit_scale[name]:.3g})"
            for name, acc in self.train_accuracy.items()
        )

    def describe_probe(self) -> str:
        """One line for the log: each head's probe decay and how it was chosen."""
        return ", ".join(
            f"{name} decay {decay:g} ({self.probe_selection[name]})"
            for name, decay in self.probe_decay.items()
        )


@torch.no_grad()
def imprint_classifiers(
    net: Network,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    num_classes: int,
    logit_scale: float | None = None,
    centered: bool = True,
    calibrate: bool = True,
    probe: bool = False,
    signed_pairs: Mapping[str, int] | None = None,
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
        probe: After imprinting, refit every classifier as the bias-free logistic regression
            of the same features' directions (:func:`crasmra.finetune.probe.probe_linear`;
            linear probing before fine-tuning, Kumar et al., ICLR 2022). The leave-one-out
            predictions (and so the fitted combination weights) stay those of the imprinted
            classifiers.
        signed_pairs: Per head, the number ``r`` of ``(relu(z), relu(-z))`` pairs its
            classifier's input starts with (:attr:`crasmra.finetune.HeadPaths.signed_pairs`).
            A head with ``r > 0`` is imprinted (and probed) on ``relu(z) - relu(-z)``, ``z``
            itself for a stage head (the class-mean coordinates of its pooled map), and its
            classifier gets ``[W, -W, 0]``: it starts linear in the stage's pooled map, as
            ``plain``'s classifier is in its pooled features, and gives the pairs' other half
            (the pooled ``|z|``) no weight. None or 0: every input feature on its own.

    Returns:
        Per head, the nearest-class-mean accuracy on the imprinting data itself (a check
        that the features separate the classes, not a validation figure) and the scale used.
    """
    if calibrate:
        calibrate_batchnorm(net, lambda: (images for images, _ in batches()))
    layers = classifier_layers(net)
    was_training = net.training
    net.eval()
    names = list(layers)
    sums = {name: torch.zeros(num_classes, layer.in_features) for name, layer in layers.items()}
    counts = torch.zeros(num_classes)
    features: dict[str, list[Tensor]] = {name: [] for name in layers}
    labels: list[Tensor] = []

    def record(i: int, h: Tensor, target: Tensor) -> None:
        if i == 0:  # once per batch
            counts.add_(torch.bincount(target, minlength=num_classes).float())
            labels.append(target)
        h = h.cpu()  # (B, D)
        sums[names[i]].index_add_(0, target, h)
        features[names[i]].append(h)

    try:
        run_capturing_inputs(net, batches, list(layers.values()), record)
    finally:
        net.train(was_training)
    if counts.sum() == 0:
        raise ValueError("head_init 'imprint' found no training images to imprint from.")
    present = counts > 0
    y = torch.cat(labels)
    train_accuracy: dict[str, float] = {}
    scales: dict[str, float] = {}
    loo_probs: dict[str, Tensor] = {}
    loo_labels = torch.zeros(0, dtype=torch.long)
    probe_decay: dict[str, float] = {}
    probe_selection: dict[str, str] = {}
    for name, layer in layers.items():
        pairs = (signed_pairs or {}).get(name, 0)
        h = torch.cat(features[name])  # (N, D)
        class_sums = sums[name]
        target = layer
        if pairs > 0:
            # (N, D) -> (N, r): relu(z) - relu(-z) = z.
            h = h[:, :pairs] - h[:, pairs : 2 * pairs]
            class_sums = class_sums[:, :pairs] - class_sums[:, pairs : 2 * pairs]
            target = nn.Linear(pairs, layer.out_features, bias=layer.bias is not None)
        means = class_sums / counts.clamp(min=1).unsqueeze(1)  # (K, D)
        center = means[present].mean(dim=0) if centered else means.new_zeros(means.shape[1])
        directions = centred_directions(means, center, present)
        cosine = F.normalize(h - center, dim=1) @ directions.T  # (N, K)
        train_accuracy[name] = float((cosine.argmax(dim=1) == y).float().mean())
        # W = (scale / mean centred norm) * direction: the logits of a feature of average
        # norm span `scale` times the cosine.
        mean_norm = float((h - center).norm(dim=1).mean())
        loo = leave_one_out_logits(h, y, class_sums, counts, center)
        if logit_scale is None:
            scale = fit_logit_scale(loo, y, mean_norm, FALLBACK_LOGIT_SCALE)
        else:
            scale = float(logit_scale)
        if mean_norm > 0:
            loo_probs[name] = (scale * loo[0] / mean_norm).softmax(dim=1)
            loo_labels = y[loo[1]]
        usable_norm = mean_norm > 0 and math.isfinite(mean_norm)
        weight_scale = scale / mean_norm if usable_norm else 0.0
        imprint_linear(target, means, center, weight_scale, present)
        scales[name] = scale
        if probe and usable_norm:
            _, choice = probe_linear(target, h, y, center, mean_norm)
            probe_decay[name], probe_selection[name] = choice.decay, choice.selection
        if pairs > 0:
            _expand_signed(layer, target, pairs)
    return ImprintReport(train_accuracy, scales, loo_probs, loo_labels, probe_decay,
                         probe_selection)
