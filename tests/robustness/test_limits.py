"""Bounded time and memory (issue 18, items 5, 6 and 13 again): a graph that never ends is stopped inside ONNX
Runtime by the time limit or by SIGTERM, and tensors larger than the memory budget are refused before anything
materializes them.

Cases that would exhaust memory without the guard run in a child process under an address-space limit, so that a
regression fails the test instead of the machine.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tiexport
from fixtures.models import tiny_conv
from tests.robustness.helpers import assert_one_line, cli
from tiexport.errors import UnusableInputError, UsageError
from tiexport.limits import LimitExceeded, memory_budget, time_limit

ROOT = Path(__file__).resolve().parents[2]


def endless(**over: object) -> onnx.ModelProto:
    """tiny_conv with its output sent through a Loop of 2**62 trips (an identity body): never returns in ONNX Runtime.
    ``w_folded=False`` by default so that fix's weight folding changes the graph and parity runs."""
    m = tiny_conv(**{"w_folded": False, **over})
    out = m.graph.output[0]
    shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, shape)])
    m.graph.initializer.append(numpy_helper.from_array(np.array(2**62, np.int64), "trips"))
    m.graph.node.append(helper.make_node("Loop", ["trips", "", out.name], ["looped"], name="endless", body=body))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("looped", TensorProto.FLOAT, shape))
    return m


def range_into_cast(limit: int = 2**40) -> onnx.ModelProto:
    """Range(0, limit) -> Cast -> Add to the input: 96 bytes; onnx's data propagation through the Cast and ONNX
    Runtime's Range would each allocate 8 TiB."""
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("start", 0), ("limit", limit),
                                                                              ("delta", 1))]
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Add", ["x", "rf"], ["y"], name="add")]
    g = helper.make_graph(nodes, "range_into_cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [limit])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _limited_child(code: str, gib: int = 3, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python with ``gib`` GiB of address space: exhausting memory fails, not the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gib * 2**30, gib * 2**30))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------------ 6. time limit
def test_parity_stops_an_endless_loop_at_the_time_limit(tmp_path: Path) -> None:
    path = tmp_path / "endless.onnx"
    onnx.save(endless(w_folded=True), str(path))
    start = time.monotonic()
    rc, out, err = cli("parity", str(path), "-r", str(path), "-n", "1", "--time-limit", "1.5")
    assert time.monotonic() - start < 30
    assert rc == 2 and out == ""
    assert_one_line(err, "parity stopped at the time limit of 1.5 s")


def test_fix_stops_at_the_time_limit_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "endless.onnx"
    onnx.save(endless(), str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _, err = cli("fix", str(path), "-d", "AM68A", "-o", str(out_dir / "fixed.onnx"), "-n", "1",
                       "--time-limit", "1.5")
    assert rc == 2
    assert_one_line(err, "fix stopped at the time limit of 1.5 s; nothing written")
    assert list(out_dir.iterdir()) == []


def test_python_api_time_limit(tmp_path: Path) -> None:
    path = tmp_path / "endless.onnx"
    onnx.save(endless(w_folded=True), str(path))
    with pytest.raises(LimitExceeded, match="time limit of 1 s"):
        tiexport.check_parity(str(path), str(path), num_samples=1, time_limit=1)
    with pytest.raises(LimitExceeded, match="fix stopped"):
        tiexport.fix(endless(), "AM68A", num_samples=1, time_limit=1)
    for bad in (-1, "10", float("nan"), True):
        with pytest.raises(UsageError, match="time_limit"):
            tiexport.fix(tiny_conv(), "AM68A", time_limit=bad)  # type: ignore[arg-type]


def test_a_stopped_run_does_not_stop_the_next() -> None:
    with pytest.raises(LimitExceeded), time_limit(0.05, "first"):
        time.sleep(0.3)
    _, report = tiexport.fix(tiny_conv(), "AM68A", time_limit=60)
    assert report.parity is not None  # ran to the end


def test_without_a_limit_the_default_applies_and_zero_lifts_it(tmp_path: Path) -> None:
    path = tmp_path / "clean.onnx"
    onnx.save(tiny_conv(), str(path))
    rc, _, err = cli("fix", str(path), "-d", "AM68A", "-o", str(tmp_path / "o.onnx"), "--time-limit", "0")
    assert rc == 0, err
    rc, _, err = cli("parity", str(path), "-r", str(path), "-n", "1", "--time-limit", "-3")
    assert rc == 2
    assert_one_line(err, "time_limit must be a number of seconds >= 0")


# ------------------------------------------------------------------------------------------------ 13. SIGTERM in C
def test_sigterm_stops_a_run_inside_onnx_runtime(tmp_path: Path) -> None:
    """Python's SIGTERM handler cannot run while ONNX Runtime holds the main thread; the watcher thread stops the
    run, the writers unwind: exit 143 within seconds, no output, no temp file."""
    path = tmp_path / "endless.onnx"
    onnx.save(endless(), str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tiexport.cli", "fix", str(path), "-d", "AM68A", "-o",
                             str(out_dir / "fixed.onnx"), "-n", "1", "--time-limit", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(6)  # imports, passes, checks: parity is then inside the Loop
    assert proc.poll() is None, proc.communicate()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 15
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------ 5. memory
def test_range_into_cast_is_refused_not_materialized(tmp_path: Path) -> None:
    path = tmp_path / "range.onnx"
    onnx.save(range_into_cast(), str(path))
    code = f"""
import sys
from tiexport.cli import main
for argv in (["validate", {str(path)!r}, "-d", "AM68A"], ["parity", {str(path)!r}, "-r", {str(path)!r}, "-n", "1"],
             ["fix", {str(path)!r}, "-d", "AM68A", "-o", {str(tmp_path / "f.onnx")!r}]):
    rc = main(argv)
    print("RC", argv[0], rc, flush=True)
"""
    proc = _limited_child(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RC "))
    assert codes == {"validate": "1", "parity": "2", "fix": "1"}, proc.stdout + proc.stderr
    assert "tensor 'r' would hold 1099511627776 elements" in proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_shape_inference_keeps_the_range_shape_without_data_propagation() -> None:
    from tiexport.shapes import infer_shapes

    inferred = infer_shapes(range_into_cast(2**40))
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    assert shapes["r"] == [2**40] and shapes["rf"] == [2**40]
    small = infer_shapes(range_into_cast(6))  # small: data propagation stays on
    assert {vi.name for vi in small.graph.value_info} >= {"r", "rf"}


def test_memory_budget_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIEXPORT_MEMORY_LIMIT", "64")  # bytes: tiny_conv's 108-byte weight is over it
    assert memory_budget() == 64
    with pytest.raises(UnusableInputError, match=r"conv_weight.*over the memory budget of 64 B"):
        tiexport.validate(tiny_conv(), "AM68A")
    monkeypatch.setenv("TIEXPORT_MEMORY_LIMIT", "2G")
    assert memory_budget() == 2 * 2**30
    monkeypatch.setenv("TIEXPORT_MEMORY_LIMIT", "lots")
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(path))
    rc, _, err = cli("validate", str(path))
    assert rc == 2
    assert_one_line(err, "TIEXPORT_MEMORY_LIMIT='lots'")
