"""One exception family for everything a user can cause, and the one-line form of any error.

The CLI turns a :class:`TiexportError` into one line on stderr and exit code 2; anything else reaching a user is a
bug. Messages are written for the user: they name the file or argument and say what is wrong with it. Errors raised
by other libraries (onnx, ONNX Runtime, torch) are quoted through :func:`first_line`.
"""

from __future__ import annotations

__all__ = ["TiexportError", "UnusableInputError", "UsageError", "first_line"]


class TiexportError(Exception):
    """Base class of all user-facing errors raised by tiexport."""


class UnusableInputError(TiexportError):
    """The input file (or model object) cannot be used at all: missing, unreadable, not ONNX, truncated."""


class UsageError(TiexportError):
    """The call itself is wrong: unknown device, bad option value, conflicting arguments."""


def first_line(error: BaseException | str, default: str | None = None, limit: int = 500) -> str:
    """The first non-blank line of an error's message, stripped and cut to ``limit`` characters, for quoting in a
    one-line message. An empty message gives ``default``, or the exception's type name when ``default`` is None."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()[:limit]
    if default is not None:
        return default
    return type(error).__name__ if isinstance(error, BaseException) else ""
