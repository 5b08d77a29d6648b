"""The errors crasmra reports to a user, with one base class.

Every error here carries a message that says what to change. The command line prints it as one
line, without a traceback, and exits with the error's ``exit_code``: 2 for bad input (the
convention of argparse), 1 for a run that failed on good input. This module imports nothing
from the package, so every layer may raise these errors.
"""

from __future__ import annotations

__all__ = ["CrasmraError", "MissingExtraError", "UsageError", "printable"]


class CrasmraError(Exception):
    """Base class of the errors that reach a user as one line.

    Attributes:
        exit_code: The command line's exit status for this error.
    """

    exit_code: int = 2

    def one_line(self) -> str:
        """The message with its whitespace folded, as the command line prints it."""
        return " ".join(str(self).split())


class UsageError(CrasmraError):
    """A problem with the user's input: a flag, a path or a combination of options."""


class MissingExtraError(CrasmraError, ImportError):
    """An optional dependency group is not installed; the message gives the install command.

    Args:
        what: What needs the extra, e.g. ``"Grad-CAM"``.
        extra: The name of the extra in ``pyproject.toml``.
        packages: The packages the extra brings, for the message.
    """

    def __init__(self, what: str, extra: str, packages: str) -> None:
        self.extra = extra
        super().__init__(
            f"{what} needs {packages}, from crasmra's optional '{extra}' extra: "
            f'pip install "crasmra[{extra}]" (in a clone of the repository: '
            f'pip install -e ".[{extra}]")'
        )


def printable(text: object) -> str:
    """``text`` with its control characters escaped as ``repr`` does (``\\n``, ``\\x1b``).

    Class names, file names and paths come from files and folders that anyone may have named;
    printed as they are, a newline forges an output line and an ESC sequence drives the
    terminal. Every other character is kept.
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
