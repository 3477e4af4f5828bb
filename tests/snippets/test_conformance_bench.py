"""bench/conformance_snippets.py without TI's code: how it reads a checkout's release, compares options, and refuses
to run with no checkout (the runs against TI's tools are in bench/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.conformance_snippets import _classifier, _compare, checkout_release
from fixtures.models import tiny_conv
from tiexport.snippets import runtime_options

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("rel", "text", "release"), [
    ("version.py", "__version__ = '9.2.0'\n", "9.2"),  # TexasInstruments/edgeai-benchmark r9.2
    ("edgeai_benchmark/version.py", "__version__ = '11.0'\n", "11.0"),  # edgeai-tensorlab r11.0
    ("edgeai_benchmark/version.py", '__version__ = "10.1.4"\n', "10.1"),
])
def test_checkout_release_reads_version_py(tmp_path: Path, rel: str, text: str, release: str) -> None:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
    assert checkout_release(str(tmp_path)) == release


def test_compare_ignores_paths_and_names_differences() -> None:
    tidl = {"tidl_tools_path": "$TIDL_TOOLS_PATH", "artifacts_folder": "a", "accuracy_level": 0, "debug_level": 0}
    assert _compare(tidl, {"accuracy_level": 0, "debug_level": 0, "calibration_frames": 12}) == "same"
    assert _compare(tidl, {"accuracy_level": 1}) == "accuracy_level: 1 != 0; debug_level: '<missing>' != 0"
    assert _compare(None, {}) == "n/a" and _compare(tidl, None) == "not loaded"


def test_bench_classifier_is_deployable_everywhere() -> None:
    model = _classifier(tiny_conv(size=1, kernel=1))
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
    for device in ("TDA4VM", "AM68A"):
        runtime_options(model, device)  # no IncompatibleModelError


def test_without_checkouts_it_says_what_to_set() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "conformance_snippets.py")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 2 and "TI_EDGEAI_BENCHMARK_92" in res.stderr
