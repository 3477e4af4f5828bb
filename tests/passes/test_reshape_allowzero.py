"""ClearReshapeAllowzeroPass: ``allowzero=1`` goes where the constant shape has no zero (it cannot matter there)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.passes.export_helpers import model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.reshape_allowzero import ClearReshapeAllowzeroPass


def _reshape(shape: list[int]) -> onnx.ModelProto:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    out = [d if d else 2 for d in shape]
    return model(nodes, {"x": [2, 3]}, {"y": out}, {"shape": np.array(shape, np.int64)}, markers=False)


def test_allowzero_is_dropped_when_the_shape_has_no_zero() -> None:
    before = _reshape([3, 2])
    out, results = apply(before, ClearReshapeAllowzeroPass(), ClearReshapeAllowzeroPass())
    assert not out.graph.node[0].attribute
    assert results[0].changes == 1 and not results[1].modified
    assert_valid(out)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])


def test_allowzero_stays_when_the_shape_has_a_zero() -> None:
    m = model([helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)], {"x": [0, 3]}, {"y": [3, 0]},
              {"shape": np.array([3, 0], np.int64)}, markers=False)
    _, results = apply(m, ClearReshapeAllowzeroPass())
    assert not results[0].modified
