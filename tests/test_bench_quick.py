"""The benchmarks run: ``bench/run_all.py --quick`` (tiny models, one round, no peers) in a subprocess, as CI runs it.

The quick mode measures nothing worth recording; these tests check that every script still runs against the current
API, prints its sections, stays within the CI time budget, and leaves ``bench/RESULTS.md`` alone.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
BUDGET_S = 60.0  # issue 8: the CI check must finish in under a minute on 2 cores

pytestmark = pytest.mark.torch


@dataclass
class QuickRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    results_before: str
    results_after: str


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.fixture(scope="module")
def quick_run() -> QuickRun:
    pytest.importorskip("torch")
    before = _digest(RESULTS)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    return QuickRun(proc.returncode, proc.stdout, proc.stderr, seconds, before, _digest(RESULTS))


def test_quick_run_exits_zero(quick_run: QuickRun) -> None:
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]


def test_quick_run_fits_the_ci_budget(quick_run: QuickRun) -> None:
    assert quick_run.seconds < BUDGET_S, f"run_all --quick took {quick_run.seconds:.1f} s"


@pytest.mark.parametrize("key", ["validate", "fix", "parity", "scaling", "qat", "ptc", "qat-ops"])
def test_quick_run_prints_each_section(quick_run: QuickRun, key: str) -> None:
    begin, end = f"<!-- BEGIN bench:{key} -->", f"<!-- END bench:{key} -->"
    assert begin in quick_run.stdout and end in quick_run.stdout, quick_run.stderr[-2000:]
    block = quick_run.stdout.split(begin, 1)[1].split(end, 1)[0]
    # a section either measured something (a timing table) or says why it was skipped
    assert "| contender |" in block or "| blocks |" in block or "status: **skipped**" in block


def test_quick_run_leaves_results_md_alone(quick_run: QuickRun) -> None:
    assert quick_run.results_after == quick_run.results_before


def test_resnet50_model_has_resnet50_size() -> None:
    pytest.importorskip("torch")
    from bench.models import parameter_count, resnet50

    assert parameter_count(resnet50()) == 25_557_032  # torchvision's ResNet-50 count, same layout


@pytest.mark.parametrize(("model", "batch"), [("digits CNN", 16), ("ResNet-20 32x32", 4)])
def test_qat_step_dispatches_no_more_ops_than_torch_ao(model: str, batch: int) -> None:
    # issue 20's target on both bench models, observers live: top-level ops per training step <= torch.ao's
    torch = pytest.importorskip("torch")
    from bench.bench_qat import _batches, _factory
    from bench.bench_qat_ops import _one_step, _tiexport, _torch_ao, count_step_ops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data, factory = _batches(model, batch, 3), _factory(model)
        counts = {}
        for name, make in (("tiexport", _tiexport), ("torch.ao", _torch_ao)):
            step = _one_step(make(factory, data, "cpu", False), data, "cpu")
            step()
            step()
            counts[name] = count_step_ops(step).top
    finally:
        torch.set_num_threads(threads)
    assert counts["tiexport"] <= counts["torch.ao"], counts
