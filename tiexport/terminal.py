"""Text for terminals: ANSI colours, only when the stream is a TTY and NO_COLOR is unset.

Reports (validate, parity) render plain text and ask :func:`paint` to colour a few words; the CLI decides with
:func:`use_colour` whether the stream takes colours.
"""

from __future__ import annotations

import os
import re
from typing import IO

__all__ = ["COLOURS", "paint", "safe_text", "use_colour"]

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


# Our own colour codes pass; every other control character (C0 but newline and tab, DEL, C1 -- ESC included, so no
# cursor moves, title or hyperlink sequences) and the bidirectional overrides ("Trojan source") are shown escaped.
_UNSAFE = re.compile("(" + "|".join(re.escape(c) for c in (*COLOURS.values(), _RESET)) + ")"
                     r"|([\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069])")


def safe_text(text: str) -> str:
    """``text`` with control characters a model could smuggle in (node names, producer_name, op types) escaped as
    ``\\xNN`` / ``\\uNNNN``, so printing a report cannot drive the terminal; tiexport's own colours are kept."""

    def fix(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(1)
        c = m.group(2)
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _UNSAFE.sub(fix, text)
