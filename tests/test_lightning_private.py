"""The installed Lightning still has every private name crasmra relies on."""

from __future__ import annotations

import importlib
import inspect

import pytest

from crasmra.lightning_private import PRIVATE_NAMES


@pytest.mark.parametrize(
    ("owner", "name"), PRIVATE_NAMES, ids=[f"{o}.{n}" for o, n in PRIVATE_NAMES]
)
def test_lightning_has_the_private_name(owner: str, name: str) -> None:
    import lightning

    module, _, cls_name = owner.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    if hasattr(cls, name):
        return
    # Instance attributes are assigned in a constructor of the class or one of its bases.
    sources = "".join(inspect.getsource(base) for base in cls.__mro__ if base is not object
                      and base.__module__.startswith("lightning"))
    assert f"self.{name} =" in sources or f"self.{name}:" in sources, (
        f"Lightning {lightning.__version__} has no {owner}.{name}; update "
        "crasmra/lightning_private.py for this version."
    )


def test_every_private_use_goes_through_the_one_module() -> None:
    """No other module of the package touches these names."""
    from conftest import REPO

    names = {name for _, name in PRIVATE_NAMES}
    offenders = []
    for path in (REPO / "src" / "crasmra").rglob("*.py"):
        if path.name == "lightning_private.py":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {n}" for n in sorted(names) if f".{n}" in text
                      or f"def {n}(" in text]
    assert not offenders, offenders
