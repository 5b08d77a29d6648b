"""The registry of attention modules that can follow a backbone stage.

A module is one class with the contract of :mod:`crasmra.layers.cram`::

    Module(in_channels, out_channels, **options); forward(x) -> (x_e, x_s)

- ``x_e``: the map the stage's head reads, ``(N, out_channels, h, w)``. In CRAM it is the
  output of the Conv_layer (``conv_layer``, the setting that picks that layer's kind).
- ``x_s``: the map the next stage reads, ``(N, in_channels, h, w)``.

That is everything the rest of crasmra asks of a module. Grad-CAM (``crasmra cam``, ``crasmra
serve``) explains ``x_e`` itself, as the model returns it, so a module needs no ``conv_layer``
attribute or other named layer; a module whose ``x_e`` is not a 4-D map that its stage head
reads is refused with a message naming it. Exports trace ``forward`` as it is.

and one registration::

    @register_attention("toy")
    class ToyAttention(nn.Module): ...

after which ``--model.net.variant toy`` trains it. An installed package makes its modules known
to the ``crasmra`` command through the entry-point group ``crasmra.attention`` (name ->
``module:Class``); they are loaded the first time a name is looked up. Its constructor
receives, of the network's
settings, those its signature names (``conv_layer``, ``reduction``, ``omega``, ``delta``,
``suppress_source``), plus ``--model.net.attention_options``: options of its own reach the
command line with no other edit.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from torch import nn

__all__ = ["attention_names", "create_attention", "get_attention", "register_attention"]

#: The entry-point group through which installed packages add attention modules.
ENTRY_POINT_GROUP = "crasmra.attention"

log = logging.getLogger(__name__)
_REGISTRY: dict[str, type[nn.Module]] = {}
_plugins_loaded = False
_Module = TypeVar("_Module", bound=type[nn.Module])


def _load_plugins() -> None:
    """Register the attention modules that installed packages declare, once per process.

    A plugin that cannot be imported is skipped with a warning: it must not break crasmra.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            cls = entry.load()
        except Exception as err:  # any import error of third-party code
            log.warning("Attention module %r (%s) cannot be loaded: %s", entry.name, entry.value,
                        err)
            continue
        if entry.name not in _REGISTRY:
            _REGISTRY[entry.name] = cls


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
    """The registered attention modules, in registration order (installed plugins last)."""
    _load_plugins()
    return tuple(_REGISTRY)


def get_attention(name: str) -> type[nn.Module]:
    """The class registered as ``name``.

    Raises:
        ValueError: No module has that name; the message lists the registered ones.
    """
    _load_plugins()
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
    accepted = {p for p in parameters if p not in ("in_channels", "out_channels")}
    options = dict(options or {})
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"Attention {name!r} ({cls.__name__}) takes no option(s) {unknown}; its options "
            f"are {sorted(accepted)}. Change --model.net.attention_options."
        )
    kwargs = {k: v for k, v in (settings or {}).items() if k in accepted}
    kwargs.update(options)
    return cls(in_channels, out_channels, **kwargs)
