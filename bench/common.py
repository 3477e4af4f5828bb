"""Shared machinery for the benchmarks: timed subprocess and in-process runs, statistics, target checks, the machine
description, and the writer that updates one section of ``bench/RESULTS.md`` without touching the others.

Method (issue 8): every contender of a comparison runs the same number of times, interleaved, with the order reversed
on every other round so that neither side always runs first (warm caches) or last; the figure is the median, with the
min-max beside it. One unmeasured warm-up round first pays for the page cache. tiexport's own modules are
byte-compiled before anything is timed (:func:`byte_compile_tiexport`), as pip does when it installs the package: in
an editable checkout under ``PYTHONDONTWRITEBYTECODE=1`` (set on the development machine) every process would
otherwise compile ~50 modules from source, 0.06 s per ``tiexport`` command that a user never pays. Peak RSS of a
subprocess is read from ``os.wait4`` in a small launcher process (that command only; ``RUSAGE_CHILDREN`` would report
the maximum over every child this process ever reaped, and a child forked straight from a process that has torch
loaded inherits its high-water mark).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BENCH_DIR",
    "REPO_ROOT",
    "Check",
    "Config",
    "Section",
    "Timing",
    "at_least",
    "at_most",
    "common_arguments",
    "config_from_args",
    "emit",
    "have_module",
    "linear_fit",
    "load_text",
    "machine_description",
    "peer_command",
    "render_section",
    "render_timings",
    "run_once",
    "script_main",
    "show_commands",
    "tiexport_command",
    "time_callables",
    "time_commands",
    "update_results",
]

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class Config:
    """How much to measure and where to keep the generated models."""

    quick: bool
    runs: int
    """Measured rounds per contender (issue 8: at least 5 for recorded figures)."""
    warmup: int
    work: Path
    """Folder for generated models (``bench/_work``, git-ignored; a fresh temporary folder in quick mode)."""
    peers: bool = True
    """Run peer tools (Polygraphy, onnxslim, torch.ao) where installed."""
    results: Path | None = None
    """Where to write the sections (None: print only)."""
    torch_device: str = "cpu"
    """Where the torch benchmarks (QAT, PTC) run: ``cpu`` or ``cuda``."""


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="only check that the benchmark runs: tiny models, one round, no RESULTS.md update")
    parser.add_argument("--runs", type=int, default=None, help="measured rounds per contender (default 5; quick 1)")
    parser.add_argument("--work", type=Path, default=None, help="folder for generated models (default bench/_work)")
    parser.add_argument("--no-peers", action="store_true", help="skip Polygraphy / onnxslim / torch.ao")
    parser.add_argument("--results", type=Path, default=None,
                        help="RESULTS.md to update (default bench/RESULTS.md; quick mode: none unless given)")
    parser.add_argument("--torch-device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the torch benchmarks (QAT/PTC); their sections get a -cuda suffix on cuda")


def config_from_args(args: argparse.Namespace) -> Config:
    quick = bool(args.quick)
    if args.work is not None:
        work = args.work
    elif quick:
        work = Path(tempfile.mkdtemp(prefix="tiexport-bench-quick-"))
    else:
        work = BENCH_DIR / "_work"
    work.mkdir(parents=True, exist_ok=True)
    runs = args.runs if args.runs is not None else (1 if quick else 5)
    if not quick:
        byte_compile_tiexport()
    results = args.results if args.results is not None else (None if quick else RESULTS_PATH)
    return Config(quick=quick, runs=max(1, runs), warmup=0 if quick else 1, work=work, peers=not args.no_peers,
                  results=results, torch_device=getattr(args, "torch_device", "cpu"))


def byte_compile_tiexport() -> None:
    """Write ``__pycache__`` for the tiexport package, as ``pip install`` does (see the module docstring)."""
    import compileall

    package = BENCH_DIR.parent / "tiexport"
    if package.is_dir():
        compileall.compile_dir(str(package), quiet=1)


def have_module(name: str) -> bool:
    """True when ``name`` can be imported (a module being written by someone else may not exist yet)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _bin(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def tiexport_command() -> list[str]:
    """How a user runs tiexport: the console script (its start-up cost is part of what they wait for)."""
    script = _bin("tiexport")
    return [script] if script else [sys.executable, "-m", "tiexport.cli"]


def peer_command(tool: str, module: str) -> list[str] | None:
    """The peer's console script, or None (with the reason logged) when the peer is not installed."""
    if not have_module(module):
        log.info("peer %s not installed (pip install -e '.[bench]')", tool)
        return None
    script = _bin(tool)
    return [script] if script else None


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Repeated measurements of one contender."""

    name: str
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    """Peak resident set size per run, bytes (subprocess runs only)."""
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls) if self.walls else float("nan")

    @property
    def lo(self) -> float:
        return min(self.walls) if self.walls else float("nan")

    @property
    def hi(self) -> float:
        return max(self.walls) if self.walls else float("nan")

    @property
    def peak_rss(self) -> int:
        return max(self.rss) if self.rss else 0


# A tiny launcher between us and the measured command. Linux carries a process's peak RSS across fork and exec
# (exec records the old image's high-water mark), so a command started straight from this process (torch loaded,
# hundreds of MB) would report at least our size. Started from a bare interpreter (``-S``: no site, ~10 MB) it
# reports its own. The launcher also takes the wall time, so its own start-up is not counted.
_LAUNCH = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.execvp(sys.argv[2], sys.argv[2:])\n"
    "    finally:\n"
    "        os._exit(127)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "wall = time.perf_counter() - t\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(f'{wall} {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')\n"
)


def run_once(cmd: Sequence[str], *, timeout: float = 900.0, env: dict[str, str] | None = None,
             ) -> tuple[float, int, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that command, exit code, tail of its stderr+stdout).

    Output goes to temporary files, not pipes, so a chatty tool can neither block on a full pipe nor pay for our
    reading it. A run past ``timeout`` is killed (its whole process group) and reported as exit code -9.
    """
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCH, result.name, *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return timeout, 0, -9, f"killed after {timeout:.0f} s"
        out.seek(0)
        tail = out.read()[-2000:].decode("utf-8", "replace")
        fields = result.read().split()
    if len(fields) != 3:
        return float("nan"), 0, proc.returncode or -1, tail
    wall, rc, maxrss = float(fields[0]), int(fields[1]), int(fields[2])
    return wall, maxrss * (1 if sys.platform == "darwin" else 1024), rc, tail


def time_commands(commands: dict[str, list[str]], cfg: Config, *, ok: Sequence[int] = (0,),
                  timeout: float = 900.0) -> dict[str, Timing]:
    """Interleaved, order-alternating subprocess runs of every command (see the module docstring)."""
    names = list(commands)
    timings = {n: Timing(n) for n in names}
    for round_ in range(cfg.warmup + cfg.runs):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            wall, rss, rc, tail = run_once(commands[name], timeout=timeout)
            if rc not in ok:
                timings[name].failures.append(f"exit {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
                log.warning("%s failed (exit %s): %s", name, rc, tail.strip()[-500:])
                continue
            if round_ >= cfg.warmup:
                timings[name].walls.append(wall)
                timings[name].rss.append(rss)
    return timings


def time_callables(funcs: dict[str, Callable[[], object]], cfg: Config, *, runs: int | None = None,
                   warmup: int | None = None) -> dict[str, Timing]:
    """Interleaved, order-alternating in-process runs of every callable."""
    names = list(funcs)
    timings = {n: Timing(n) for n in names}
    n_runs = cfg.runs if runs is None else runs
    n_warm = cfg.warmup if warmup is None else warmup
    for round_ in range(n_warm + n_runs):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            funcs[name]()
            wall = time.perf_counter() - start
            if round_ >= n_warm:
                timings[name].walls.append(wall)
    return timings


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line: (slope, intercept, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return slope, intercept, r2


# ------------------------------------------------------------------------------------------------ targets
@dataclass
class Check:
    """One target of issue 8 against its measured value."""

    metric: str
    value: float
    target: str
    passed: bool
    margin: str
    """How far from the target: the headroom when it passes, the size of the miss when it does not."""


def at_most(metric: str, value: float, limit: float, unit: str = "") -> Check:
    ok = value <= limit
    if ok:
        margin = f"{(1 - value / limit) * 100:.0f}% under" if limit else "-"
    else:
        margin = f"over by {value - limit:.3g}{unit} ({(value / limit - 1) * 100:.0f}%)"
    return Check(metric, value, f"<= {limit:g}{unit}", ok, margin)


def at_least(metric: str, value: float, limit: float, unit: str = "") -> Check:
    ok = value >= limit
    if ok:
        margin = f"{(value / limit - 1) * 100:.0f}% over" if limit else "-"
    else:
        margin = f"short by {limit - value:.3g}{unit} ({(1 - value / limit) * 100:.0f}%)"
    return Check(metric, value, f">= {limit:g}{unit}", ok, margin)


# ------------------------------------------------------------------------------------------------ reporting
@dataclass
class Section:
    """One benchmark's part of RESULTS.md."""

    key: str
    title: str
    command: str
    body: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_after: tuple[float, float, float] | None = None
    status: str = "ok"
    """ok | skipped (a piece it needs does not exist yet) | failed."""

    def finish(self) -> Section:
        self.load_after = os.getloadavg()
        return self


def _fmt_load(load: tuple[float, float, float] | None) -> str:
    return "?" if load is None else " / ".join(f"{x:.2f}" for x in load)


def render_timings(timings: dict[str, Timing], baseline: str | None = None, *, rss: bool = False) -> list[str]:
    """A markdown table: median, min-max, runs, (peak RSS), ratio to ``baseline``."""
    head = "| contender | median s | min-max s | runs |"
    sep = "|---|---:|---:|---:|"
    if rss:
        head += " peak RSS MB |"
        sep += "---:|"
    if baseline:
        head += f" ratio vs {baseline} |"
        sep += "---:|"
    lines = [head, sep]
    base = timings[baseline].median if baseline and baseline in timings else None
    for t in timings.values():
        if not t.walls:
            lines.append(f"| {t.name} | failed: {t.failures[0] if t.failures else 'no runs'} | | 0 |"
                         + (" |" if rss else "") + (" |" if baseline else ""))
            continue
        row = f"| {t.name} | {t.median:.4g} | {t.lo:.4g}-{t.hi:.4g} | {len(t.walls)} |"
        if rss:
            row += f" {t.peak_rss / 2**20:.0f} |"
        if baseline:
            row += f" {t.median / base:.2f} |" if base else " - |"
        lines.append(row)
    return lines


def render_section(section: Section, machine: str) -> str:
    s = section
    out = [f"<!-- BEGIN bench:{s.key} -->", f"## {s.title}", ""]
    out.append(f"- machine: {machine}")
    out.append(f"- command: `{s.command}`")
    out.append(f"- date: {s.started}")
    out.append(f"- load average (1/5/15 min) before: {_fmt_load(s.load_before)}, after: {_fmt_load(s.load_after)}")
    if s.status != "ok":
        out.append(f"- status: **{s.status}**")
    out.append("")
    out.extend(s.body)
    if s.checks:
        out += ["", "| target | measured | required | verdict | margin |", "|---|---:|---:|---|---|"]
        for c in s.checks:
            out.append(f"| {c.metric} | {c.value:.3g} | {c.target} | {'PASS' if c.passed else 'MISS'} | {c.margin} |")
    if s.notes:
        out.append("")
        out.extend(f"- {n}" for n in s.notes)
    out += ["", f"<!-- END bench:{s.key} -->"]
    return "\n".join(out) + "\n"


_HEADER = """# Benchmark results

Measured by `python bench/run_all.py` (each `bench_*.py` also runs alone). Every section says on which machine,
with which command, when, and under what load (the machine is shared: a load average near or above the core count
means other work competed for the CPU and the absolute times are inflated; ratios measured in interleaved rounds
are less affected). Times are medians of interleaved, order-alternating rounds, with min-max. Sections between
`BEGIN/END bench:` markers are rewritten by the scripts; everything else in this file is kept as it is.

"""


def load_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def update_results(path: Path, key: str, text: str) -> None:
    """Replace the ``bench:key`` block of ``path`` (or append it), leaving every other line as it is.

    Read right before writing and written atomically, because other benchmark owners edit the same file.
    """
    begin, end = f"<!-- BEGIN bench:{key} -->", f"<!-- END bench:{key} -->"
    current = load_text(path) or _HEADER
    i, j = current.find(begin), current.find(end)
    if i >= 0 and j > i:
        j += len(end)
        if current[j:j + 1] == "\n":
            j += 1
        new = current[:i] + text + current[j:]
    else:
        new = current.rstrip("\n") + "\n\n" + text
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "?"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:  # not a git checkout (a copied tree)
            return "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tiexport"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        # several people work in this checkout: say when what was measured is not exactly the commit
        return (rev or "?") + (" + uncommitted edits in tiexport/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_description() -> str:
    """CPU, cores, memory, OS, Python and the versions of everything measured."""
    pkgs = ", ".join(f"{d} {_version(d)}" for d in ("onnx", "onnxruntime", "torch", "polygraphy", "onnxslim"))
    return (f"{_cpu_model()}, {os.cpu_count()} cores, {_mem_gib()} RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; {pkgs}; tiexport at git {_git_rev()}")


def show_commands(commands: dict[str, list[str]], paths: dict[str, Path]) -> list[str]:
    """Markdown bullet list of the commands, with the interpreter/script shortened and long paths named."""
    lines = []
    for label, cmd in commands.items():
        shown = [Path(cmd[0]).name, *cmd[1:]]
        text = shlex.join(shown)
        for alias, p in paths.items():
            text = text.replace(str(p), alias)
        lines.append(f"- {label}: `{text}`")
    lines.extend(f"- {alias} = `{p.name}`" for alias, p in paths.items())
    return lines


def emit(sections: list[Section], cfg: Config) -> int:
    """Print every section and, unless quick, write it into RESULTS.md. Exit code 1 when one failed."""
    machine = machine_description()
    for s in sections:
        if s.load_after is None:
            s.finish()
        text = render_section(s, machine)
        print(text)
        if cfg.results is not None:
            update_results(cfg.results, s.key, text)
    return 1 if any(s.status == "failed" for s in sections) else 0


def script_main(run: Callable[[Config], list[Section]], doc: str | None, argv: list[str] | None = None) -> int:
    """Entry point shared by every ``bench_*.py``: parse the common options, run, emit."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    common_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = config_from_args(args)
    return emit(run(cfg), cfg)
