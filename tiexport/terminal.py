"""Text for terminals: ANSI colours, only when the stream is a TTY and NO_COLOR is unset.

Reports (validate, parity) render plain text and ask :func:`paint` to colour a few words; the CLI decides with
:func:`use_colour` whether the stream takes colours.
"""

from __future__ import annotations

import os
from typing import IO

__all__ = ["COLOURS", "paint", "use_colour"]

COLOURS = {"error": "\033[31m", "warning": "\033[33m", "info": "\033[36m", "ok": "\033[32m", "bold": "\033[1m"}
_RESET = "\033[0m"


def paint(text: str, key: str, colour: bool) -> str:
    """``text`` in the colour named ``key`` (a :data:`COLOURS` key) when ``colour``, else unchanged."""
    return f"{COLOURS[key]}{text}{_RESET}" if colour else text


def use_colour(stream: IO[str]) -> bool:
    """Colours only on a TTY, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
