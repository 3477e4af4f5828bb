"""Issue 18, round two: bad arguments to the Python API and the CLI are one-line tiexport errors (UsageError, exit 2),
never a TypeError/ValueError/MemoryError from inside; two initializers of one name are refused, not silently
resolved one way by fix and the other way by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import tiexport
from fixtures.models import tiny_conv
from tiexport.cli import main
from tiexport.errors import UnusableInputError, UsageError

M = tiny_conv()


@pytest.mark.parametrize("call, match", [
    (lambda: tiexport.validate(M, device=5), "device must be a name"),
    (lambda: tiexport.validate(M, device=b"AM68A"), "device must be a name"),
    (lambda: tiexport.validate(M, device=[b"AM68A"]), "a device is a name"),
    (lambda: tiexport.fix(M, "AM68A", input_shapes="1x3x8x8"), "input_shapes must be a mapping"),
    (lambda: tiexport.fix(M, "AM68A", max_iterations=0), "max_iterations must be an integer >= 1"),
    (lambda: tiexport.check_parity(M, M, seed=-1), "seed must be an integer >= 0"),
    (lambda: tiexport.check_parity(M, M, num_samples=100_000_000), "use fewer samples"),
    (lambda: tiexport.fix(M, "AM68A", seed=-3), "seed must be an integer >= 0"),
], ids=["device_int", "device_bytes", "device_list_bytes", "input_shapes_str", "max_iterations_0", "seed_negative",
        "num_samples_huge", "fix_seed_negative"])
def test_bad_api_arguments_are_usage_errors(call: Any, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        call()


@pytest.mark.parametrize("argv", [["parity", "{m}", "-r", "{m}", "--seed", "-1"],
                                  ["parity", "{m}", "-r", "{m}", "-n", "100000000"],
                                  ["fix", "{m}", "-d", "AM68A", "-o", "{o}", "--seed", "-1"]])
def test_bad_cli_numbers_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              argv: list[str]) -> None:
    m = tmp_path / "m.onnx"
    onnx.save(M, str(m))
    assert main([a.format(m=m, o=tmp_path / "o.onnx") for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_two_initializers_of_one_name_are_an_error_and_fix_refuses() -> None:
    model = tiny_conv()
    scale = next(i for i in model.graph.initializer if i.name == "conv_weight_scale")
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(4), scale.name))
    findings = [f for f in tiexport.validate(model, "AM68A").findings if f.rule_id == "TIDL002"]
    assert [(f.severity, f.node) for f in findings] == [("error", "conv_weight_scale")]
    with pytest.raises(UnusableInputError, match="'conv_weight_scale' is defined twice"):
        tiexport.fix(model, "AM68A")
