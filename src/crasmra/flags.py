"""Command-line parsing rules shared by every ``crasmra`` command.

Two rules, for the argparse commands and the LightningCLI ones alike:

- No abbreviations. argparse would read ``--trainer.max_epoch 3`` as ``--trainer.max_epochs``
  and ``--model.delt`` as ``--model.net.delta``; a typo must not silently pick a flag.
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
    "allowed_class_packages",
    "apply_parsing_rules",
    "check_class_paths",
    "did_you_mean",
    "lightning_parser_class",
    "refused_class_path",
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

    Built on first use because it imports Lightning. Building it applies
    :func:`apply_parsing_rules` (the class-path allow-list and the YAML reader).
    """
    apply_parsing_rules()
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import LightningArgumentParser

    class CrasmraLightningArgumentParser(LightningArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            denied = _DENIED.search(message)
            if denied:
                # jsonargparse's own refusal, worded for its settings, not for crasmra's users.
                message = refused_class_path(denied.group(1) or denied.group(2))
            if not self.exit_on_error:
                ArgumentParser.error(self, message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            _report(prog, message, parser)

    return CrasmraLightningArgumentParser


#: Packages whose classes and functions a config may name: in ``class_path`` (callbacks,
#: loggers, plugins, optimisers), as a bare import path (``--trainer.callbacks=pkg.Cb``), in
#: ``--x.help pkg.Cb``, or as a callable value (e.g. LambdaCallback's ``on_fit_start``).
#: jsonargparse imports a path's module to resolve it, so an arbitrary one would run that
#: module's code before anything could refuse it.
CLASS_PATH_PACKAGES = ("crasmra", "lightning", "pytorch_lightning", "torch", "torchmetrics", "timm")
#: Environment variable naming further packages (comma-separated), e.g. your own callbacks'.
CLASS_PATH_ENV = "CRASMRA_CLASS_PACKAGES"
#: Options that take a class (by path or as ``{class_path: ..., init_args: ...}``).
_CLASS_OPTIONS = ("trainer.callbacks", "trainer.logger", "trainer.plugins", "trainer.strategy",
                  "trainer.profiler", "trainer.accelerator", "optimizer", "lr_scheduler")
#: jsonargparse's refusal of an import path (see apply_parsing_rules).
_DENIED = re.compile(
    r"Importing '([\w.]+)' is not allowed|class_path '([\w.]+)' is outside the packages")
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")
#: The oldest jsonargparse that enforces an import-path allow-list on parsed values.
_POLICY_JSONARGPARSE = "4.53"
#: Packages of $CRASMRA_CLASS_PACKAGES allowed earlier in this process (see apply_parsing_rules).
_allowed_before: set[str] = set()


def allowed_class_packages() -> tuple[str, ...]:
    """:data:`CLASS_PATH_PACKAGES` and the packages listed in ``$CRASMRA_CLASS_PACKAGES``.

    Raises:
        UsageError: An entry of the variable is not a module name.
    """
    import os

    from crasmra.errors import UsageError

    extra = [p.strip() for p in os.environ.get(CLASS_PATH_ENV, "").split(",") if p.strip()]
    for entry in extra:
        if not all(part.isidentifier() for part in entry.split(".")) or \
                entry.split(".", 1)[0] == "jsonargparse":
            raise UsageError(f"${CLASS_PATH_ENV} lists {entry!r}, which is not the name of a "
                             "package or module (e.g. mypackage or mypackage.callbacks).")
    return (*CLASS_PATH_PACKAGES, *extra)


def apply_parsing_rules() -> None:
    """Make every jsonargparse parser of this process follow crasmra's two input rules.

    - **Imports.** An import path given as a value, wherever jsonargparse resolves one (a
      ``class_path``, a bare path in a list of callbacks or plugins, ``--x.help PATH``, a
      callable such as LambdaCallback's hooks, a nested ``--trainer='{...}'``), must lie in
      :func:`allowed_class_packages`; any other is refused before its module is imported. This
      is jsonargparse's own import-path policy (deny ``*``, allow these packages), checked
      where it imports, so no spelling of a value gets around it.
    - **YAML.** Every YAML text jsonargparse reads (config files, flag values) is first checked
      by :func:`crasmra.config.check_yaml_text`: a YAML bomb or absurd nesting is refused in
      milliseconds instead of expanding for minutes.

    Raises:
        UsageError: The installed jsonargparse is too old to enforce the allow-list, or
            ``$CRASMRA_CLASS_PACKAGES`` is malformed.
    """
    import jsonargparse

    from crasmra.errors import UsageError

    allowed = allowed_class_packages()
    try:
        # Packages allowed by an earlier value of the variable are denied again (an entry in
        # both lists is allowed, so only those no longer listed are named in the denylist).
        stale = sorted(_allowed_before - set(allowed))
        jsonargparse.set_parsing_settings(import_path_denylist=["*", *stale],
                                          import_path_allowlist=list(allowed))
    except TypeError as err:
        raise UsageError(
            f"crasmra needs jsonargparse >= {_POLICY_JSONARGPARSE} to refuse class paths outside "
            f"the allowed packages (installed: {jsonargparse.__version__}); run: pip install -U "
            "jsonargparse"
        ) from err
    _allowed_before.clear()
    _allowed_before.update(a for a in allowed if a not in CLASS_PATH_PACKAGES)
    _install_yaml_check()


def _install_yaml_check() -> None:
    from jsonargparse import get_loader, set_loader

    loader = get_loader("yaml")
    if getattr(loader, "crasmra_checked", False):
        return

    def checked_yaml_load(text: str) -> Any:
        from crasmra.config import check_yaml_text

        if isinstance(text, str):
            check_yaml_text(text, "a YAML value or config")
        return loader(text)

    checked_yaml_load.crasmra_checked = True  # type: ignore[attr-defined]
    import yaml

    set_loader("yaml", checked_yaml_load, exceptions=(yaml.YAMLError,))


def _walk_class_paths(node: Any, listed: bool = False) -> Iterable[str]:
    """Class paths in a parsed value: ``class_path`` entries, and with ``listed`` (the value of
    an option that takes classes) the bare dotted strings it holds or lists."""
    if listed and isinstance(node, str):
        if _DOTTED.match(node.strip()):
            yield node.strip()
        return
    stack: list[tuple[Any, bool]] = [(node, listed)]
    while stack:
        item, bare = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "class_path" and isinstance(value, str):
                    yield value
                elif key == "trainer" and isinstance(value, dict):
                    # --trainer='{callbacks: [...]}' or a config's trainer section.
                    for option, classes in value.items():
                        stack.append((classes, f"trainer.{option}" in _CLASS_OPTIONS))
                else:
                    stack.append((value, False))
        elif isinstance(item, list):
            stack.extend((child, bare) for child in item)
        elif bare and isinstance(item, str) and _DOTTED.match(item.strip()):
            yield item.strip()


def _yaml(text: str) -> Any:
    import yaml

    from crasmra.config import load_yaml

    try:
        return load_yaml(text, "a config")
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
        elif key.endswith(".class_path") or key == "class_path" or key.endswith(".help"):
            yield value.strip()
        elif key == "trainer":
            yield from _walk_class_paths({"trainer": _yaml(value)})
        elif key.split(".", 1)[-1] in _CLASS_OPTIONS or key in _CLASS_OPTIONS:
            if _DOTTED.match(value.strip()):
                yield value.strip()
            else:
                yield from _walk_class_paths(_yaml(value), listed=True)


def check_class_paths(args: Sequence[str] | dict[str, Any]) -> None:
    """Refuse a class path outside the allowed packages early, with a message that says how
    to allow one.

    A first, friendly check of the command line (or a parsed config): jsonargparse itself
    enforces the same allow-list wherever it imports (see :func:`apply_parsing_rules`), so a
    path this scan does not recognise is still refused there, before its module is imported.
    Bare class names (``ModelCheckpoint``) are resolved by jsonargparse among the classes
    Lightning registers, and pass.

    Raises:
        UsageError: A class path names a module outside :data:`CLASS_PATH_PACKAGES` and the
            packages listed in ``$CRASMRA_CLASS_PACKAGES``.
    """
    from crasmra.errors import UsageError

    allowed = allowed_class_packages()
    paths = (_walk_class_paths(args) if isinstance(args, dict)
             else _class_paths_in_args(args))
    for path in paths:
        if "." in path and not any(path == a or path.startswith(f"{a}.") for a in allowed):
            raise UsageError(refused_class_path(path, allowed))


def refused_class_path(path: str, allowed: Sequence[str] | None = None) -> str:
    """The one-line message refusing ``path`` (a class path or another import path)."""
    allowed = allowed_class_packages() if allowed is None else allowed
    return (f"class_path {path!r} is outside the packages a config may load classes and "
            f"functions from ({', '.join(allowed)}); it was not imported. To use a class of your "
            f"own package, add the package to ${CLASS_PATH_ENV} (comma-separated).")
