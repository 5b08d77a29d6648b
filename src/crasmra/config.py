"""Reading run configs: YAML files that may build on a base file through ``__base__``.

The public API below the command line that ``crasmra fit`` and sweeps share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crasmra.errors import UsageError

__all__ = ["BASE_KEY", "deep_merge", "expand_config_args", "load_config"]


BASE_KEY = "__base__"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, merging the files its ``__base__`` key names (paths relative to it).

    A recipe is then a short file over a shared base: ``__base__: ../base.yaml`` followed by
    what differs. Nested sections merge key by key; anything else in the file replaces the base.
    """
    import yaml

    path = Path(path).resolve()
    if path in _chain:
        raise UsageError(
            f"Config {path} includes itself through {BASE_KEY}: {[str(p) for p in _chain]}"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of settings, not {type(data).__name__}.")
    bases = data.pop(BASE_KEY, None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise UsageError(f"{path}: {BASE_KEY} names {base_path}, which does not exist.")
        merged = deep_merge(merged, load_config(base_path, (*_chain, path)))
    return deep_merge(merged, data)


def expand_config_args(args: Sequence[str]) -> list[str]:
    """Replace every ``--config FILE`` whose file uses ``__base__`` by its merged content.

    jsonargparse's own nested ``config:`` key does not merge nested sections (a recipe's
    ``data:`` would reset the base's ``data:``), hence this resolution before parsing.
    """
    import yaml

    out: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg in ("--config", "-c") and i + 1 < len(items):
            value, i = items[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        try:
            is_file = "\n" not in value and Path(value).is_file()
        except OSError:  # a YAML string rather than a path
            is_file = False
        if is_file and BASE_KEY in (Path(value).read_text()):
            value = yaml.safe_dump(load_config(value), sort_keys=False)
        out.append(f"--config={value}")
    return out
