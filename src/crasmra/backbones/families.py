"""The kinds of timm model a backbone can be, and how a plain ViT runs block group by group.

* ``"cnn"``: stages are children called in order and give ``(B, C, H, W)`` maps at any input
  size (ResNet, DenseNet, ConvNeXt, EfficientNet, ...).
* ``"hierarchical"``: Transformers with CNN-like stages (Swin, Swin-V2): children in order,
  but timm builds them for one input size and Swin's maps are ``(B, H, W, C)``. They are built
  for the training size (timm's ``img_size``) with dynamic sizes on, so that other sizes run too.
* ``"tokens"``: plain ViTs (ViT, DeiT, EVA): one token sequence through all blocks, one
  feature_info entry per block. Blocks are grouped into stages; between groups the patch tokens
  are a ``(B, C, H, W)`` map on the patch grid, and the class, distillation and register tokens
  pass by the attention module unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CNN",
    "HIERARCHICAL",
    "TOKENS",
    "TokenSegments",
    "TokenState",
    "backbone_family",
    "size_options",
    "token_stage_ends",
    "token_tail",
]

CNN, HIERARCHICAL, TOKENS = "cnn", "hierarchical", "tokens"

#: Modules of a plain ViT after its blocks: the final norm, pooling and classifiers.
_TOKEN_HEAD_MODULES = ("norm", "fc_norm", "attn_pool", "head_drop", "head", "head_dist")


def _token_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer, Eva)


def _fixed_size(model: nn.Module) -> bool:
    return bool((getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"))


def backbone_family(model: nn.Module) -> str:
    """``"tokens"`` (ViT, DeiT, EVA), ``"hierarchical"`` (a Transformer timm builds for one
    input size, or whose maps are channels-last) or ``"cnn"``."""
    if isinstance(model, _token_classes()):
        return TOKENS
    if _fixed_size(model) or getattr(model, "output_fmt", "NCHW") == "NHWC":
        return HIERARCHICAL
    return CNN


def _init_parameters(cls: type) -> frozenset[str]:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` up to the base classes
    (timm's DeiT-distilled passes everything on to VisionTransformer)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names)


def size_options(
    model: nn.Module, name: str, img_size: int | Sequence[int] | None
) -> dict[str, Any]:
    """The timm constructor options that build ``model`` for ``img_size`` px and any other size.

    CNNs need none. A Transformer timm pins to one size is built for ``img_size`` (None: timm's
    default) with ``dynamic_img_size=True`` (or ``strict_img_size=False``) so that it also runs
    at other sizes; plain ViTs also pad an input that is not a multiple of the patch size.

    Args:
        model: The model as timm builds it by default (a ``meta``-device copy is enough).
        name: Its timm name, for messages.
        img_size: The training input size, int or ``(h, w)``.

    Raises:
        ValueError: a fixed-size model whose timm class cannot take other sizes.
    """
    if not _fixed_size(model):
        return {}
    accepted = _init_parameters(type(model))
    options: dict[str, Any] = {}
    if "dynamic_img_size" in accepted:
        options["dynamic_img_size"] = True
    elif "strict_img_size" in accepted:
        options["strict_img_size"] = False
    else:
        cfg = model.pretrained_cfg
        size = "x".join(str(s) for s in cfg.get("input_size", ())[1:]) or "one"
        raise ValueError(
            f"Backbone {name!r} ({type(model).__name__}) takes only {size} px inputs: its timm "
            "class has neither dynamic_img_size nor strict_img_size, so its stages cannot run "
            "at the sizes CRA-SMRA trains at. Use a Swin (swin_*, swinv2_*), a plain ViT (vit_*, "
            "deit_*, eva02_*) or a CNN (resnet50, convnext_tiny, ...)."
        )
    if img_size is not None and "img_size" in accepted:
        options["img_size"] = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if isinstance(model, _token_classes()) and "dynamic_img_pad" in accepted:
        options["dynamic_img_pad"] = True
    return options


def token_stage_ends(depth: int) -> tuple[int, ...]:
    """The default stages of a plain ViT: its blocks in four equal groups, the last three
    attended (ViT-B's 12 blocks: groups end after blocks 6, 9 and 12, indices 5, 8, 11).
    Fewer than four blocks: the last three."""
    if depth < 4:
        return tuple(range(max(depth - 3, 0), depth))
    return tuple(round(depth * k / 4) - 1 for k in (2, 3, 4))


def token_tail(model: nn.Module, last: int, final_features: bool) -> tuple[str, ...]:
    """Module paths of a plain ViT that the staged forward never calls: the blocks after block
    ``last``, and its norm (kept with ``final_features``), pooling and classifiers."""
    blocks = [f"blocks.{i}" for i in range(last + 1, len(model.blocks))]
    heads = [p for p in _TOKEN_HEAD_MODULES if isinstance(getattr(model, p, None), nn.Module)]
    if final_features:
        heads = [p for p in heads if p != "norm"]
    return (*blocks, *heads)


class TokenState(NamedTuple):
    """A plain ViT between two block groups.

    Attributes:
        prefix: (B, P, C) class, distillation and register tokens (P may be 0).
        fmap: (B, C, H, W) patch tokens on the patch grid: what the attention module reads.
        rope: EVA's rotary position embedding for this grid (None for ViT/DeiT), made once
            per image so that every group uses the same one, as timm does.
    """

    prefix: Tensor
    fmap: Tensor
    rope: Tensor | None


class TokenSegments:
    """Runs a timm ViT/DeiT/EVA one block group at a time, as its ``forward_features`` does.

    Segment 0 embeds the patches (patch embedding, position embedding, prefix tokens, pre-norm)
    and runs blocks ``0..ends[0]``; segment ``i`` runs blocks ``ends[i-1]+1..ends[i]`` on the
    prefix tokens followed by the (possibly re-weighted) patch map of the previous group.

    Args:
        ends: Index of the last block of each group, increasing.
        num_prefix_tokens: Class + distillation + register tokens ahead of the patch tokens.
        final_norm: Apply the model's final norm after the last group (``final_features``).
    """

    def __init__(self, ends: Sequence[int], num_prefix_tokens: int, final_norm: bool) -> None:
        self.ends = tuple(ends)
        self.num_prefix_tokens = num_prefix_tokens
        self.final_norm = final_norm

    @staticmethod
    def check(model: nn.Module, name: str) -> None:
        """Refuse what would change the patch grid between groups (patch dropout)."""
        drop = getattr(model, "patch_drop", None)
        if drop is not None and not isinstance(drop, nn.Identity):
            raise ValueError(
                f"Backbone {name!r} was built with patch dropout, which removes patch tokens and "
                "breaks the patch grid CRAM reads; build it with patch_drop_rate=0."
            )

    def run(self, model: nn.Module, index: int, x: Tensor | TokenState) -> TokenState:
        """Block group ``index`` on images (index 0) or the previous :meth:`with_map`."""
        if index == 0:  # x: (B, 3, H, W) images
            tokens, grid, rope = self._embed(model, x)
            start = 0
        else:  # x: a TokenState
            grid = (x.fmap.shape[-2], x.fmap.shape[-1])
            # (B, C, H, W) -> (B, H*W, C), behind the untouched prefix tokens.
            tokens = torch.cat([x.prefix, x.fmap.flatten(2).transpose(1, 2)], dim=1)
            rope, start = x.rope, self.ends[index - 1] + 1
        mixed = bool(getattr(model, "rope_mixed", False))
        for i in range(start, self.ends[index] + 1):
            block = model.blocks[i]
            if rope is None:
                tokens = block(tokens)
            else:
                tokens = block(tokens, rope=rope[i] if mixed else rope)
        if self.final_norm and index == len(self.ends) - 1:
            tokens = model.norm(tokens)
        return self._split(tokens, grid, rope)

    @staticmethod
    def _embed(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        x = model.patch_embed(images)
        # Built with dynamic_img_size, timm's patch embedding gives (B, H, W, C): the grid of
        # this input; otherwise (B, H*W, C) on the grid it was built for.
        grid = (x.shape[1], x.shape[2]) if x.dim() == 4 else tuple(model.patch_embed.grid_size)
        embedded = model._pos_embed(x)  # (B, P + H*W, C); EVA also returns its rope
        tokens, rope = embedded if isinstance(embedded, tuple) else (embedded, None)
        return model.norm_pre(tokens), (grid[0], grid[1]), rope

    def _split(self, tokens: Tensor, grid: tuple[int, int], rope: Tensor | None) -> TokenState:
        b, _, c = tokens.shape
        p = self.num_prefix_tokens
        # (B, P + H*W, C) -> prefix (B, P, C) and patches (B, C, H, W), a view of the tokens.
        fmap = tokens[:, p:].transpose(1, 2).reshape(b, c, grid[0], grid[1])
        return TokenState(tokens[:, :p], fmap, rope)

    def stage_map(self, state: TokenState) -> Tensor:
        """The ``(B, C, H, W)`` patch map of a group's output (or input)."""
        return state.fmap

    def with_map(self, state: TokenState, x: Tensor) -> TokenState:
        """The next group's input: the same prefix tokens and rope, ``x`` as the patch map."""
        return state._replace(fmap=x)

