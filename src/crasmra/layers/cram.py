"""Channel re-attention (CRAM) and the modules that can stand in its place.

Every module here follows one contract, so the paper's ablation rows are one config value:

    forward(x) -> (x_e, x_s)

``x_e`` (B, out_channels, H, W) is the map for the stage's classifier head (and for SMRAM in
training); ``x_s`` (B, in_channels, H, W) is the map the next backbone stage reads.

* :class:`CRAM`: the paper's module (SPEC, "CRAM").
* :class:`CBAMAttention`: timm's CBAM in CRAM's place (the paper's Table 3, row 2).
* :class:`IdentityAttention`: no attention, only the projection to the head width (row 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from numbers import Integral, Real
from typing import Literal

import torch
from timm.layers.cbam import CbamModule
from torch import Tensor, nn

from crasmra.layers.registry import register_attention

__all__ = [
    "CONV_LAYERS",
    "CRAM",
    "DEFAULT_DELTA",
    "DEFAULT_OMEGA",
    "DEFAULT_REDUCTION",
    "SUPPRESS_SOURCES",
    "CBAMAttention",
    "IdentityAttention",
    "build_conv_layer",
    "check_delta",
    "check_omega",
    "check_suppress_top_k",
    "record_channel_importance",
    "suppression_mask",
    "top_k_suppression_mask",
]

#: CRAM's defaults: the paper's omega and delta; r = 16 is CBAM's usual value (not stated by
#: the paper). The network's configuration (:class:`crasmra.model.NetConfig`) reads them here.
DEFAULT_OMEGA = 0.5
DEFAULT_DELTA = 0.9
DEFAULT_REDUCTION = 16

ConvLayerKind = Literal["light", "pmg"]
CONV_LAYERS: tuple[str, ...] = ("light", "pmg")
SuppressSource = Literal["input", "enhanced"]
#: What CRAM's suppression mask S multiplies to give x_s (see :class:`CRAM`).
SUPPRESS_SOURCES: tuple[str, ...] = ("input", "enhanced")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # PMG's BasicConv: bias-free conv (BN supplies the shift), BN, ReLU.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def build_conv_layer(kind: str, in_channels: int, out_channels: int) -> nn.Sequential:
    """Build the Conv_layer that projects a stage's enhanced map to the head width C_a.

    The paper leaves this layer open (SPEC open point). Two choices:

    * ``"light"`` (default): 1x1 conv + BN + ReLU. It is the cheapest projection that still
      mixes channels; for ResNet50 at 448 px with C_a = 512 it adds about 1.4 GMACs over the
      three stages (~9% of the backbone), which keeps the whole network near the paper's
      "lightweight" claim.
    * ``"pmg"``: PMG's block, 1x1 conv to C_a/2 then 3x3 conv to C_a (each BN + ReLU). The 3x3
      conv runs at stage 3's resolution (56x56 at 448 px) and costs about 4x the light layer.

    Args:
        kind: ``"light"`` or ``"pmg"``.
        in_channels: Channels of the stage output.
        out_channels: C_a, the head width.

    Returns:
        The projection as an ``nn.Sequential``.
    """
    if kind == "light":
        return _conv_bn_relu(in_channels, out_channels, 1)
    if kind == "pmg":
        hidden = max(1, out_channels // 2)
        return nn.Sequential(
            _conv_bn_relu(in_channels, hidden, 1),
            _conv_bn_relu(hidden, out_channels, 3),
        )
    raise ValueError(f"conv_layer must be one of {CONV_LAYERS}, got {kind!r}")


def suppression_mask(
    importance: Tensor, omega: float = DEFAULT_OMEGA, delta: float = DEFAULT_DELTA
) -> Tensor:
    """Hard channel-suppression mask S of SPEC step 5.

    ``S_k = omega`` where ``softmax(I)_k >= delta * max_j softmax(I)_j`` (per sample), else 1.
    The mask is a constant: it is computed without gradient, so gradients reach X only through
    the product ``S * X``.

    Args:
        importance: (B, C) channel importance I, after the sigmoid.
        omega: Factor applied to the suppressed channels, in [0, 1].
        delta: Relative threshold in (0, 1]; 1 suppresses only the top channel(s).

    Returns:
        (B, C) mask with the dtype and device of ``importance``.
    """
    if importance.ndim != 2:
        raise ValueError(f"importance must be (B, C), got shape {tuple(importance.shape)}")
    with torch.no_grad():
        probs = importance.float().softmax(dim=1)
        suppressed = probs >= delta * probs.amax(dim=1, keepdim=True)
        # 1 for kept channels, omega for suppressed ones.
        mask = 1.0 - (1.0 - omega) * suppressed.float()
    return mask.to(importance.dtype)


def top_k_suppression_mask(logits: Tensor, omega: float, top_k: int) -> Tensor:
    """Channel-suppression mask that damps exactly ``top_k`` channels per sample.

    ``S_k = omega`` for the ``top_k`` channels with the largest importance logits
    ``a + m`` (the input of the sigmoid that gives I), else 1. With ``top_k = 1`` it is what
    :func:`suppression_mask` with ``delta = 1`` gives in exact arithmetic when one channel is
    the most important: the sigmoid and the softmax preserve the channels' order. In
    float32, though, I rounds to exactly 1.0 for every logit above about 17, and an importance
    MLP whose hidden units are all inactive gives every channel the logit 0; the threshold
    then ties many channels (all of them, in the second case) and damps every one. Here ties
    go to one channel (``torch.topk``'s choice). Computed without gradient, as the threshold.

    Args:
        logits: (B, C) importance logits, before the sigmoid.
        omega: Factor applied to the suppressed channels, in [0, 1].
        top_k: How many channels to suppress, at least 1 (at most C are).

    Returns:
        (B, C) mask with the dtype and device of ``logits``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    dtype = logits.dtype
    with torch.no_grad():
        logits = logits.float()
        top = logits.topk(min(top_k, logits.shape[1]), dim=1).indices  # (B, k)
        # 1.0 at the suppressed channels, 0.0 elsewhere.
        suppressed = torch.zeros_like(logits).scatter(1, top, 1.0)
        mask = 1.0 - (1.0 - omega) * suppressed
    return mask.to(dtype)


def check_suppress_top_k(top_k: object, hint: str = ".") -> int | None:
    """CRAM's ``suppress_top_k`` as an int >= 1 or None, or a ValueError.

    Args:
        top_k: None (the paper's threshold) or an integer >= 1 (not a bool).
        hint: Appended to the error message, e.g. which option to change.
    """
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1:
        raise ValueError(
            f"suppress_top_k must be null (the paper's delta threshold) or an integer >= 1, "
            f"got {top_k!r}{hint}"
        )
    return int(top_k)


def check_omega(omega: object, hint: str = ".") -> float:
    """CRAM's suppression factor omega as a float, or a ValueError.

    Args:
        omega: A real number in [0, 1] (not a bool).
        hint: Appended to the error message, e.g. which option to change.
    """
    if isinstance(omega, bool) or not isinstance(omega, Real) or not 0.0 <= omega <= 1.0:
        raise ValueError(
            f"omega must be a number in [0, 1] (paper: {DEFAULT_OMEGA}), got {omega!r}{hint}"
        )
    return float(omega)


def check_delta(delta: object, hint: str = ".") -> float:
    """CRAM's relative suppression threshold delta as a float, or a ValueError.

    Args:
        delta: A real number in (0, 1] (not a bool).
        hint: Appended to the error message, e.g. which option to change.
    """
    if isinstance(delta, bool) or not isinstance(delta, Real) or not 0.0 < delta <= 1.0:
        raise ValueError(
            f"delta must be a number in (0, 1] (paper: {DEFAULT_DELTA}), got {delta!r}{hint}"
        )
    return float(delta)


@register_attention("cram")
class CRAM(nn.Module):
    """Channel re-attention module (SPEC, "CRAM").

    ``I = sigmoid(MLP(avgpool(X)) + MLP(maxpool(X)))`` with a shared MLP of 1x1 convs
    (C -> C/r -> C, bias-free as in timm's CBAM channel attention). Then
    ``x_e = Conv_layer(I * X)`` and ``x_s = S * X`` with ``S = suppression_mask(I)``, or
    ``x_s = S * (I * X)`` with ``suppress_source="enhanced"``.

    Args:
        in_channels: C, channels of the stage output.
        out_channels: C_a, channels of ``x_e`` (the head width).
        reduction: r of the shared MLP; the hidden width is ``max(1, C // r)``. Default 16,
            CBAM's usual value; not stated by the paper.
        omega: Suppression factor of the mask, in [0, 1] (paper: 0.5).
        delta: Relative importance threshold, in (0, 1] (paper: 0.9).
        conv_layer: ``"light"`` (default) or ``"pmg"``; see :func:`build_conv_layer`.
        suppress_source: What the mask S multiplies to give ``x_s``; the paper's "use S to
            obtain X_s" reads either way (SPEC open point). ``"input"`` (default):
            ``x_s = S * X``, so the next stage sees the raw map with the important channels
            damped, and CRAM's MLP learns only through ``x_e``. ``"enhanced"``:
            ``x_s = S * (I * X)``, so the next stage reads the re-weighted map and its loss
            also trains CRAM's MLP through I (S itself stays a constant).
        suppress_top_k: None (default): the paper's mask, the channels whose softmax
            importance is within ``delta`` of the top one. An integer k: exactly the k
            channels with the largest importance logits (:func:`top_k_suppression_mask`),
            ``delta`` unused. Ours, not the paper's.

    Attributes:
        gate: The sigmoid that gives I, a module of its own so that a forward hook can read I
            (see :func:`record_channel_importance`); it has no parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reduction: int = DEFAULT_REDUCTION,
        omega: float = DEFAULT_OMEGA,
        delta: float = DEFAULT_DELTA,
        conv_layer: ConvLayerKind = "light",
        suppress_source: SuppressSource = "input",
        suppress_top_k: int | None = None,
    ) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if suppress_source not in SUPPRESS_SOURCES:
            raise ValueError(
                f"suppress_source must be one of {SUPPRESS_SOURCES}, got {suppress_source!r}: "
                "'input' gives x_s = S * X (default), 'enhanced' gives x_s = S * (I * X)."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.reduction = reduction
        self.omega = check_omega(omega)
        self.delta = check_delta(delta)
        self.suppress_source: SuppressSource = suppress_source
        self.suppress_top_k = check_suppress_top_k(suppress_top_k)
        hidden = max(1, in_channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1, bias=False),
        )
        self.conv_layer = build_conv_layer(conv_layer, in_channels, out_channels)
        self.gate = nn.Sigmoid()

    def channel_logits(self, x: Tensor) -> Tensor:
        """Return the importance logits a + m as (B, C, 1, 1)."""
        a = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        m = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return a + m

    def channel_importance(self, x: Tensor) -> Tensor:
        """Return I = sigmoid(a + m) as (B, C, 1, 1)."""
        return self.gate(self.channel_logits(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x_e, x_s)`` for a stage output ``x`` of shape (B, C, H, W)."""
        logits = self.channel_logits(x)  # (B, C, 1, 1)
        importance = self.gate(logits)
        enhanced = importance * x
        x_e = self.conv_layer(enhanced)
        if self.suppress_top_k is None:
            mask = suppression_mask(importance.flatten(1), self.omega, self.delta)  # (B, C)
        else:
            mask = top_k_suppression_mask(logits.flatten(1), self.omega, self.suppress_top_k)
        source = x if self.suppress_source == "input" else enhanced
        x_s = source * mask[:, :, None, None]
        return x_e, x_s

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction}, omega={self.omega}, delta={self.delta}, "
            f"suppress_source={self.suppress_source!r}, suppress_top_k={self.suppress_top_k}"
        )


@register_attention("identity")
class IdentityAttention(nn.Module):
    """No attention (the "baseline" variant): ``x_e = Conv_layer(x)``, ``x_s = x``.

    The projection keeps the heads identical across variants, so the ablation isolates the
    attention itself.

    Args:
        in_channels: C, channels of the stage output.
        out_channels: C_a, channels of ``x_e``.
        conv_layer: ``"light"`` (default) or ``"pmg"``; see :func:`build_conv_layer`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, conv_layer: ConvLayerKind = "light"
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv_layer = build_conv_layer(conv_layer, in_channels, out_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(Conv_layer(x), x)``."""
        return self.conv_layer(x), x


@register_attention("cbam")
class CBAMAttention(nn.Module):
    """timm's CBAM in CRAM's place (the "cbam" variant, the paper's Table 3 row 2).

    ``y = CbamModule(x)``; ``x_e = Conv_layer(y)``, ``x_s = y``. CBAM's refined map flows on to
    the next stage, as it does when CBAM is inserted into a network; unlike CRAM there is no
    separate suppressed branch.

    Args:
        in_channels: C, channels of the stage output.
        out_channels: C_a, channels of ``x_e``.
        reduction: r of CBAM's channel MLP (``rd_ratio = 1 / r``).
        conv_layer: ``"light"`` (default) or ``"pmg"``; see :func:`build_conv_layer`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reduction: int = DEFAULT_REDUCTION,
        conv_layer: ConvLayerKind = "light",
    ) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.reduction = reduction
        self.cbam = CbamModule(in_channels, rd_channels=max(1, in_channels // reduction))
        self.conv_layer = build_conv_layer(conv_layer, in_channels, out_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(Conv_layer(CBAM(x)), CBAM(x))``."""
        y = self.cbam(x)
        return self.conv_layer(y), y


@contextmanager
def record_channel_importance(modules: Iterable[nn.Module]) -> Iterator[list[Tensor | None]]:
    """Record the importance I of every CRAM in ``modules`` during the ``with`` block.

    Forward hooks on each CRAM's :attr:`~CRAM.gate` fill the yielded list, one (B, C) detached
    tensor per CRAM (the last call's; None until it runs); the hooks are removed on exit, so the
    modules keep no state between calls.

    Example::

        with record_channel_importance(net.attention) as importance:
            net(images)
    """
    crams = [m for m in modules if isinstance(m, CRAM)]
    records: list[Tensor | None] = [None] * len(crams)

    def recorder(index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            records[index] = output.detach().flatten(1)  # (B, C, 1, 1) -> (B, C)

        return hook

    handles = [m.gate.register_forward_hook(recorder(i)) for i, m in enumerate(crams)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
