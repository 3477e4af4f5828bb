"""Run every benchmark and write its section of ``bench/RESULTS.md``: ``python bench/run_all.py``.

``--quick`` (CI) only checks that every script runs: tiny models, one round, no peers, nothing written; it exits 1
when a benchmark fails, 0 when all ran or were skipped because a piece they need does not exist yet.
``--only validate,fix`` runs a subset. The accuracy benchmark (``bench/quant_quality.py``) has its own owner and
command and is not run from here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH_DIR, Section, common_arguments, config_from_args, emit

__all__ = ["BENCHMARKS", "main"]

log = logging.getLogger("bench.run_all")

# name -> module; order: the cheap CLI comparisons first, training last
BENCHMARKS: dict[str, str] = {
    "validate": "bench.bench_validate",
    "fix": "bench.bench_fix",
    "parity": "bench.bench_parity",
    "scaling": "bench.bench_scaling",
    "qat": "bench.bench_qat",
    "qat-ops": "bench.bench_qat_ops",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--peers", action="store_true", help="run the peers in --quick mode too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    wanted = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHMARKS)
    unknown = [b for b in wanted if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    cfg = config_from_args(args)
    if cfg.quick and not args.peers:
        cfg.peers = False  # CI: no dependency on tools outside the project
    started = time.perf_counter()
    sections: list[Section] = []
    try:
        for name in wanted:
            t0 = time.perf_counter()
            try:
                module = importlib.import_module(BENCHMARKS[name])
                sections.extend(module.run(cfg))
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                log.error("benchmark %s failed:\n%s", name, traceback.format_exc())
                s = Section(key=name, title=f"{name}: failed", command=f"python bench/run_all.py --only {name}",
                            status="failed")
                s.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                sections.append(s.finish())
            log.info("benchmark %s: %.1f s", name, time.perf_counter() - t0)
        rc = emit(sections, cfg)
    finally:
        if cfg.quick and args.work is None and BENCH_DIR not in cfg.work.parents:
            shutil.rmtree(cfg.work, ignore_errors=True)
    summary = ", ".join(f"{s.key}: {s.status}" for s in sections)
    log.info("done in %.1f s (%s)", time.perf_counter() - started, summary)
    return rc


if __name__ == "__main__":
    sys.exit(main())
