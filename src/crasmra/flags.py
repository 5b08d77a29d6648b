"""Command-line parsing rules shared by every ``crasmra`` command.

Two rules, for the argparse commands and the LightningCLI ones alike:

- No abbreviations. argparse would read ``--trainer.max_epoch 3`` as ``--trainer.max_epochs``
  and ``--model.delt`` as ``--model.delta``; a typo must not silently pick a flag.
- An unknown flag is answered with one line that names the closest valid flags, and a pointer
  to ``--help``, instead of the full usage (about a hundred lines for ``crasmra fit``).

This module imports neither torch nor Lightning at import time.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "CrasmraArgumentParser",
    "check_class_paths",
    "did_you_mean",
    "lightning_parser_class",
    "unknown_flags",
]

_UNRECOGNIZED = "unrecognized arguments: "


def unknown_flags(message: str) -> list[str]:
    """The flags (``--name``, without ``=value``) named in an "unrecognized arguments" message."""
    if _UNRECOGNIZED not in message:
        return []
    tail = message.split(_UNRECOGNIZED, 1)[1]
    return [token.split("=", 1)[0] for token in tail.split() if token.startswith("-")]


def did_you_mean(flags: Iterable[str], options: Iterable[str], limit: int = 3) -> str:
    """`` (did you mean --a, --b?)`` for the valid ``options`` closest to ``flags``, or ``""``."""
    options = sorted({o for o in options if o.startswith("--")})
    suggestions: list[str] = []
    for flag in flags:
        for match in _closest(flag, options, limit):
            if match not in suggestions:
                suggestions.append(match)
    if not suggestions:
        return ""
    return f" (did you mean {', '.join(suggestions[:limit])}?)"


def _closest(flag: str, options: Sequence[str], limit: int) -> list[str]:
    matches = difflib.get_close_matches(flag, options, n=limit, cutoff=0.75)
    if matches:
        return matches
    # `--topk` against `--top-k`, `--max_epochs` against `--trainer.max_epochs`: compare the
    # last dotted component with separators removed.
    def key(option: str) -> str:
        return re.sub(r"[-_]", "", option.rsplit(".", 1)[-1].lstrip("-"))

    wanted = key(flag)
    by_key = [o for o in options if key(o) == wanted]
    if by_key:
        return by_key[:limit]
    close = difflib.get_close_matches(wanted, [key(o) for o in options], n=limit, cutoff=0.8)
    return [o for o in options if key(o) in close][:limit]


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def _report(prog: str, message: str, parser: argparse.ArgumentParser) -> NoReturn:
    hint = did_you_mean(unknown_flags(message), _option_strings(parser))
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        names = re.findall(r"'([^']*)'", choice.group(2))
        close = difflib.get_close_matches(choice.group(1), names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
    sys.stderr.write(f"{prog}: error: {message}{hint}\n")
    sys.stderr.write(f"Run `{prog} --help` for its options.\n")
    sys.exit(2)


class CrasmraArgumentParser(argparse.ArgumentParser):
    """An argparse parser without abbreviations whose errors are one line and a hint.

    Used for the top-level parser and, through ``add_subparsers``, for every argparse
    subcommand, so an unknown flag is matched against the subcommand's own options.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        subparser = self._chosen_subparser(namespace)
        if extras and subparser is not None:
            # argparse hands a subcommand's unknown flags up to the top-level parser, whose
            # options are the wrong ones to suggest from: report them from the subcommand.
            _report(subparser.prog, _UNRECOGNIZED + " ".join(extras), subparser)
        return namespace, extras

    def _chosen_subparser(self, namespace: argparse.Namespace) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and action.dest:
                chosen = getattr(namespace, action.dest, None)
                return action.choices.get(chosen) if chosen else None
        return None

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        _report(self.prog, message, self)


def lightning_parser_class() -> type:
    """A ``LightningArgumentParser`` without abbreviations and with one-line errors.

    Built on first use because it imports Lightning.
    """
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import LightningArgumentParser

    class CrasmraLightningArgumentParser(LightningArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            if not self.exit_on_error:
                ArgumentParser.error(self, message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            _report(prog, message, parser)

    return CrasmraLightningArgumentParser


#: Packages whose classes a config may name in ``class_path`` (callbacks, loggers, plugins,
#: optimisers). jsonargparse imports a class path's module to resolve it, so an arbitrary one
#: would run that module's code before the config is even refused.
CLASS_PATH_PACKAGES = ("crasmra", "lightning", "pytorch_lightning", "torch", "torchmetrics", "timm")
#: Environment variable naming further packages (comma-separated), e.g. your own callbacks'.
CLASS_PATH_ENV = "CRASMRA_CLASS_PACKAGES"
#: Options that take a class (by path or as ``{class_path: ..., init_args: ...}``).
_CLASS_OPTIONS = ("trainer.callbacks", "trainer.logger", "trainer.plugins", "trainer.strategy",
                  "trainer.profiler", "trainer.accelerator", "optimizer", "lr_scheduler")
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")


def _walk_class_paths(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from _walk_class_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_class_paths(item)


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the parser reports it


def _class_paths_in_args(args: Sequence[str]) -> Iterable[str]:
    items = list(args)
    for i, arg in enumerate(items):
        if not arg.startswith("-"):
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        if not has_value:
            if i + 1 >= len(items):
                continue
            value = items[i + 1]
        key = key.rstrip("+")
        if key in ("config", "c"):
            try:
                is_file = "\n" not in value and Path(value).is_file()
            except OSError:  # a YAML text too long for a path
                is_file = False
            text = Path(value).read_text() if is_file else value
            yield from _walk_class_paths(_yaml(text))
        elif key.endswith(".class_path") or key == "class_path":
            yield value
        elif key.split(".", 1)[-1] in _CLASS_OPTIONS or key in _CLASS_OPTIONS:
            if _DOTTED.match(value.strip()):
                yield value.strip()
            else:
                yield from _walk_class_paths(_yaml(value))


def check_class_paths(args: Sequence[str] | dict[str, Any]) -> None:
    """Refuse a ``class_path`` outside the allowed packages, before anything imports it.

    Bare class names (``ModelCheckpoint``) are resolved by jsonargparse among the classes
    Lightning registers, and pass.

    Raises:
        UsageError: A class path names a module outside :data:`CLASS_PATH_PACKAGES` and the
            packages listed in ``$CRASMRA_CLASS_PACKAGES``.
    """
    import os

    from crasmra.errors import UsageError

    extra = [p.strip() for p in os.environ.get(CLASS_PATH_ENV, "").split(",") if p.strip()]
    allowed = (*CLASS_PATH_PACKAGES, *extra)
    paths = _walk_class_paths(args) if isinstance(args, dict) else _class_paths_in_args(args)
    for path in paths:
        if "." in path and path.split(".", 1)[0] not in allowed:
            raise UsageError(
                f"class_path {path!r} is outside the packages a config may load classes from "
                f"({', '.join(allowed)}). To use a class of your own package, add the package "
                f"to ${CLASS_PATH_ENV} (comma-separated)."
            )
