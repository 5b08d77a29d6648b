"""The registry of attention modules that can follow a backbone stage.

A module is one class with the contract of :mod:`crasmra.layers.cram`::

    Module(in_channels, out_channels, **options); forward(x) -> (x_e, x_s)

and one registration::

    @register_attention("toy")
    class ToyAttention(nn.Module): ...

after which ``--model.variant toy`` trains it. Its constructor receives, of the network's
settings, those its signature names (``conv_layer``, ``reduction``, ``omega``, ``delta``,
``suppress_source``), plus ``--model.attention_options``: options of its own reach the
command line with no other edit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["attention_names", "create_attention", "get_attention", "register_attention"]

_REGISTRY: dict[str, type[nn.Module]] = {}
_Module = TypeVar("_Module", bound=type[nn.Module])


def register_attention(name: str) -> Callable[[_Module], _Module]:
    """Class decorator: make an attention module available under ``name``.

    Raises:
        ValueError: ``name`` is taken by another class.
    """

    def register(cls: _Module) -> _Module:
        taken = _REGISTRY.get(name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(f"Attention {name!r} is already registered ({taken.__qualname__}).")
        _REGISTRY[name] = cls
        return cls

    return register


def attention_names() -> tuple[str, ...]:
    """The registered attention modules, in registration order."""
    return tuple(_REGISTRY)


def get_attention(name: str) -> type[nn.Module]:
    """The class registered as ``name``.

    Raises:
        ValueError: No module has that name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown attention module {name!r}; registered: {attention_names()}."
        ) from None


def create_attention(
    name: str,
    in_channels: int,
    out_channels: int,
    settings: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the attention module ``name`` for one stage.

    Args:
        name: A registered name.
        in_channels: C, channels of the stage output.
        out_channels: C_a, channels of ``x_e``.
        settings: The network's settings; those the constructor names are passed, the rest
            (meant for other modules) are ignored.
        options: The module's own options; each must be a parameter of its constructor.

    Raises:
        ValueError: Unknown name, or an option the constructor does not take.
    """
    cls = get_attention(name)
    parameters = inspect.signature(cls).parameters
    accepted = {p for p in parameters if p not in ("self", "in_channels", "out_channels")}
    options = dict(options or {})
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"Attention {name!r} ({cls.__name__}) takes no option(s) {unknown}; its options "
            f"are {sorted(accepted)}. Change --model.attention_options."
        )
    kwargs = {k: v for k, v in (settings or {}).items() if k in accepted}
    kwargs.update(options)
    return cls(in_channels, out_channels, **kwargs)
