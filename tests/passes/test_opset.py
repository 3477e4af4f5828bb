"""ConvertOpsetPass: down-conversion to opset 17 keeps the computation; attributes 17 lacks go only when they hold
their default."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.export_helpers import model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.opset import ConvertOpsetPass


def _reduce_mean_18(noop: int = 0) -> onnx.ModelProto:
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, noop_with_empty_axes=noop)]
    return model(nodes, {"x": [1, 2, 3]}, {"y": [1, 1, 3]}, {"axes": np.array([1], np.int64)}, opset=18, markers=False)


def test_down_conversion_to_17_drops_attributes_17_does_not_know() -> None:
    before = _reduce_mean_18()
    out, results = apply(before, ConvertOpsetPass(17), ConvertOpsetPass(17))
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert {a.name for a in out.graph.node[0].attribute} == {"axes", "keepdims"}
    assert results[0].modified and not results[1].modified
    assert_valid(out)
    x = np.random.default_rng(3).standard_normal((1, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])


def test_down_conversion_refuses_an_attribute_value_17_cannot_express() -> None:
    with pytest.raises(ValueError, match="noop_with_empty_axes"):
        apply(_reduce_mean_18(noop=1), ConvertOpsetPass(17))


def test_the_same_opset_is_left_alone() -> None:
    _, results = apply(_reduce_mean_18(), ConvertOpsetPass(18))
    assert not results[0].modified
