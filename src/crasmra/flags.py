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
from typing import Any, NoReturn

__all__ = ["CrasmraArgumentParser", "did_you_mean", "lightning_parser_class", "unknown_flags"]

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
