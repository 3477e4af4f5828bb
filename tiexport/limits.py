"""What one run may cost: a wall-clock time limit, a memory budget, and a stop that reaches into ONNX Runtime.

**Time.** ``fix`` and ``parity`` run other people's graphs: a ``Loop`` whose trip count is ``2**62`` runs in ONNX
Runtime for ever, in C++, where neither a Python exception nor a signal handler gets in. :func:`time_limit` sets a
deadline for a block; work that can be stopped registers how (:func:`cancellable`: ONNX Runtime's
``RunOptions.terminate``) and loops call :func:`check` between steps. At the deadline every registered run is told to
stop and the next :func:`check` raises :class:`LimitExceeded` (one line, exit 2, nothing written).

**SIGTERM.** The same stop serves a SIGTERM (:func:`stop`): the CLI's watcher thread calls it, so a run stuck in ONNX
Runtime returns, the main thread raises, and the writers remove their temp files. Writers register their temp files
(:func:`temp_file`) so that a process that must exit without unwinding (:func:`remove_temp_files`) still leaves none.

**Memory.** :func:`memory_budget` is the most one tensor may take, dense, before anything materializes it (onnx's
shape inference, ONNX Runtime, numpy): the machine's physical memory unless ``TIEXPORT_MEMORY_LIMIT`` says less
(bytes, or with a K/M/G/T suffix). A 100-byte model may declare a sparse constant of ``2**40`` elements or a ``Range``
to ``2**40``; the loaders and parity refuse it by this budget rather than let the process be killed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from tiexport.errors import TiexportError, UsageError

__all__ = [
    "DEFAULT_TIME_LIMIT",
    "LimitExceeded",
    "add_temp_file",
    "cancellable",
    "check",
    "discard_temp_file",
    "format_bytes",
    "memory_budget",
    "remove_temp_files",
    "stop",
    "temp_file",
    "time_limit",
]

DEFAULT_TIME_LIMIT = 900.0
"""Seconds a ``fix`` or ``parity`` may take by default: 15 minutes, some 30 times what fix with parity takes on a
1 GB model here (bench/RESULTS.md, robustness section); ``--time-limit 0`` lifts it."""


class LimitExceeded(TiexportError):
    """The time limit was reached, or the run was stopped (SIGTERM): nothing was written."""


_lock = threading.Lock()
_temps: set[str] = set()
_runs: set[_Run] = set()
_local = threading.local()


class _Run:
    """One limited run (a ``time_limit`` block, per thread): why it was stopped, and how to cancel its work."""

    def __init__(self) -> None:
        self.stopped = ""
        self.cancels: dict[int, Callable[[], None]] = {}
        self.deadline = float("inf")


def _current() -> _Run | None:
    stack: list[_Run] = getattr(_local, "runs", [])
    return stack[-1] if stack else None


def check() -> None:
    """Raise :class:`LimitExceeded` when this thread's run has been stopped (time limit or SIGTERM)."""
    run = _current()
    if run is not None and run.stopped:
        raise LimitExceeded(run.stopped)


def stop(message: str, run: _Run | None = None) -> None:
    """Stop ``run`` (None: every run in the process, as SIGTERM does): its :func:`cancellable` work is cancelled
    and its next :func:`check` raises with ``message``."""
    with _lock:
        runs = [run] if run is not None else list(_runs)
        cancels: list[Callable[[], None]] = []
        for r in runs:
            r.stopped = r.stopped or message
            cancels.extend(r.cancels.values())
    for cancel in cancels:
        with contextlib.suppress(Exception):
            cancel()


@contextlib.contextmanager
def cancellable(cancel: Callable[[], None]) -> Iterator[None]:
    """Within the block, stopping this thread's run calls ``cancel`` (e.g. ``lambda: setattr(run_options,
    "terminate", True)``). Outside any :func:`time_limit` block it does nothing."""
    run = _current()
    if run is None:
        yield
        return
    key = id(cancel)
    with _lock:
        run.cancels[key] = cancel
        stopped = bool(run.stopped)
    if stopped:
        cancel()
    try:
        yield
    finally:
        with _lock:
            run.cancels.pop(key, None)


def _seconds(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise UsageError(f"time_limit must be a number of seconds >= 0 (0 or None: no limit), got {value!r}")
    return float(value) or None


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Stop the block's work after ``seconds`` (None or 0: no limit), raising :class:`LimitExceeded`.

    A block inside another (in the same thread) joins the outer run and can only bring its deadline forward."""
    limit = _seconds(seconds)
    stack: list[_Run] = _local.__dict__.setdefault("runs", [])
    run = stack[-1] if stack else _Run()
    timer, outer_deadline = None, run.deadline
    if limit is not None and time.monotonic() + limit < run.deadline:
        run.deadline = time.monotonic() + limit
        message = (f"{what} stopped at the time limit of {limit:g} s; nothing written (raise it with --time-limit "
                   "SECONDS, 0 for none)")
        timer = threading.Timer(limit, stop, args=(message, run))
        timer.daemon = True
        timer.start()
    stack.append(run)
    with _lock:
        _runs.add(run)
    try:
        yield
        check()
    finally:
        stack.pop()
        if timer is not None:
            timer.cancel()
        run.deadline = outer_deadline
        if not stack or stack[-1] is not run:
            with _lock:
                _runs.discard(run)


@contextlib.contextmanager
def temp_file(path: str) -> Iterator[None]:
    """Register a temp file for :func:`remove_temp_files` while the block writes it."""
    with _lock:
        _temps.add(path)
    try:
        yield
    finally:
        with _lock:
            _temps.discard(path)


def add_temp_file(path: str) -> None:
    """Register a temp file that outlives one block (a staged write); :func:`discard_temp_file` when done."""
    with _lock:
        _temps.add(path)


def discard_temp_file(path: str) -> None:
    with _lock:
        _temps.discard(path)


def remove_temp_files() -> None:
    """Remove every registered temp file (a process about to exit without unwinding its writers)."""
    with _lock:
        paths = list(_temps)
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def memory_budget() -> int:
    """Bytes one tensor may take: ``TIEXPORT_MEMORY_LIMIT`` (e.g. ``8G``) or the machine's physical memory."""
    text = os.environ.get("TIEXPORT_MEMORY_LIMIT", "").strip().upper().removesuffix("B").removesuffix("I")
    if text:
        number, suffix = (text[:-1], text[-1]) if text[-1] in _SUFFIX else (text, "")
        try:
            value = float(number) * _SUFFIX[suffix]
        except ValueError:
            raise UsageError(f"TIEXPORT_MEMORY_LIMIT={os.environ['TIEXPORT_MEMORY_LIMIT']!r}: expected bytes, "
                             "optionally with a K, M, G or T suffix (e.g. 8G)") from None
        if value > 0:
            return int(value)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
