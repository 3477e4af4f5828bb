"""A tiny progress bar for long CLI runs: drawn on a TTY only, silent otherwise (pipes, CI logs, files).

No dependency: one line redrawn with a carriage return, cleared when done. Library code never draws it by itself;
it takes a ``progress(done, total)`` callback, and the CLI passes a :class:`ProgressBar`.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``bar = ProgressBar("parity", stream=sys.stderr); bar(3, 8); bar.close()`` draws ``parity [#####    ] 3/8``.

    ``enabled`` defaults to ``stream.isatty()``; a disabled bar writes nothing at all, so redirected stderr stays
    clean. Usable as a context manager (closes, i.e. erases its line, on exit) and as a ``(done, total)`` callback.
    """

    def __init__(self, label: str = "", stream: IO[str] | None = None, width: int = 30,
                 enabled: bool | None = None) -> None:
        self.label = label
        self.stream: IO[str] = stream if stream is not None else sys.stderr
        self.width = max(5, width)
        if enabled is None:
            try:
                enabled = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self._drawn = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.update(done, total)

    def update(self, done: int, total: int | None = None) -> None:
        """Redraw the bar at ``done`` of ``total`` (a bare counter when the total is unknown)."""
        if not self.enabled:
            return
        if total:
            filled = min(self.width, self.width * max(done, 0) // total)
            line = f"{self.label} [{'#' * filled}{' ' * (self.width - filled)}] {done}/{total}"
        else:
            line = f"{self.label} {done}"
        pad = " " * max(0, self._drawn - len(line))
        self._write("\r" + line + pad)
        self._drawn = len(line)

    def close(self) -> None:
        """Erase the bar so that whatever is printed next starts on a clean line."""
        if self.enabled and self._drawn:
            self._write("\r" + " " * self._drawn + "\r")
        self._drawn = 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not break the run it reports on
            self.enabled = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
