"""One exception family for everything a user can cause.

The CLI turns a :class:`TiexportError` into one line on stderr and exit code 2; anything else reaching a user is a
bug. Messages are written for the user: they name the file or argument and say what is wrong with it.
"""

from __future__ import annotations

__all__ = ["TiexportError", "UnusableInputError", "UsageError"]


class TiexportError(Exception):
    """Base class of all user-facing errors raised by tiexport."""


class UnusableInputError(TiexportError):
    """The input file (or model object) cannot be used at all: missing, unreadable, not ONNX, truncated."""


class UsageError(TiexportError):
    """The call itself is wrong: unknown device, bad option value, conflicting arguments."""
