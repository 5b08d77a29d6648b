"""Reading run configs: YAML files that may build on a base file through ``__base__``.

The public API below the command line that ``crasmra fit`` and sweeps share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crasmra.errors import UsageError

__all__ = [
    "BASE_KEY",
    "MAX_YAML_NODES",
    "check_yaml_text",
    "config_files",
    "deep_merge",
    "expand_config_args",
    "load_config",
    "load_yaml",
    "set_key",
]


BASE_KEY = "__base__"
#: The most nodes a YAML document may hold once its aliases (``*name``) are expanded. A real
#: config or sweep file has a few hundred; ten aliases of ten aliases of ... (a "billion
#: laughs" file of a few hundred bytes) expand to billions, which every reader of the parsed
#: value (merging, checking, printing) would walk.
MAX_YAML_NODES = 100_000


def _expanded_size(root: Any, where: str) -> int:
    """The number of nodes of a composed YAML node graph with every alias expanded.

    Iterative, and each node's size is computed once, so a bomb costs no more than its text.

    Raises:
        UsageError: The expansion exceeds :data:`MAX_YAML_NODES`, or an alias refers to a node
            that contains it (a recursive structure, infinite once expanded).
    """
    import yaml

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            else:
                children = []
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > MAX_YAML_NODES:
                raise UsageError(
                    f"{where} expands to more than {MAX_YAML_NODES:,} values through its YAML "
                    "aliases (*name), the mark of a YAML bomb: refused. Write the values out, or "
                    "use fewer aliases."
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise UsageError(f"{where} holds a YAML alias (*name) inside the value it names "
                             "(a recursive structure); write the values out instead.")
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, False) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((part, False) for pair in node.value for part in pair)
    return sizes.get(id(root), 0)


def check_yaml_text(text: str, where: str) -> None:
    """Refuse YAML text whose aliases expand to a huge document, or that is nested too deeply.

    Only the node graph is built, by PyYAML's Python composer (each alias is a reference, so
    this is fast for any file; nesting deeper than the recursion limit allows, a few hundred
    levels, is refused here rather than left to a C reader that may exhaust its stack);
    nothing is constructed.

    Raises:
        UsageError: A YAML bomb (see :data:`MAX_YAML_NODES`) or a recursive alias, or nesting
            deeper than Python's recursion limit allows to read.
    """
    import yaml

    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if node is not None:
                _expanded_size(node, where)
    except yaml.YAMLError:
        return  # not valid YAML: the reader that follows says why
    except RecursionError:
        raise UsageError(f"{where} is nested too deeply to read as YAML.") from None


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refusing YAML bombs and too deep nesting first.

    Args:
        text: The YAML text.
        where: What it is, for messages (a file name, ``--set data.root=...``).

    Raises:
        UsageError: See :func:`check_yaml_text`.
        yaml.YAMLError: The text is not valid YAML.
    """
    import yaml

    check_yaml_text(text, where)
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise UsageError(f"{where} is nested too deeply to read as YAML.") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (``model.net.delta``) of a nested config, creating missing sections.

    The value replaces what was there, as the same flag on the command line would.

    Raises:
        UsageError: A section on the way holds a value that is not a mapping.
    """
    *sections, last = key.split(".")
    node = config
    for i, name in enumerate(sections):
        child = node.setdefault(name, {})
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            where = ".".join(sections[: i + 1])
            raise UsageError(f"cannot set {key}: {where} is {child!r}, not a section of settings.")
        node = child
    node[last] = value


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
        data = load_yaml(path.read_text(), str(path)) or {}
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
        text = Path(value).read_text() if is_file else value
        check_yaml_text(text, f"--config {value}" if is_file else "--config")
        if is_file and BASE_KEY in text:
            value = yaml.safe_dump(load_config(value), sort_keys=False)
        out.append(f"--config={value}")
    return out


def config_files(args: Sequence[str]) -> list[Path]:
    """The files named by ``--config`` in a command line (not YAML text given inline)."""
    files: list[Path] = []
    items = list(args)
    for i, arg in enumerate(items):
        if arg in ("--config", "-c") and i + 1 < len(items):
            value = items[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        try:
            if "\n" not in value and Path(value).is_file():
                files.append(Path(value))
        except OSError:
            continue
    return files
