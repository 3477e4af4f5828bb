"""FoldWeightTransposePass: Transpose(DQ(w_q)) -> DQ(transposed w_q), the channel axis following, exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.passes.export_helpers import model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.weight_transpose import FoldWeightTransposePass


def _transposed_weight_model(axis: bool = True, extra_reader: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w_q = rng.integers(-128, 128, size=(4, 3)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"], **({"axis": 0} if axis else {})),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    outputs = {"y": [2, 4]}
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["w"], ["w_relu"]))
        outputs["w_relu"] = [4, 3]
    scale = np.array([0.1, 0.2, 0.3, 0.4], np.float32) if axis else np.array([0.1, 0.2, 0.3], np.float32)
    zp = np.zeros(scale.shape, np.int8)
    return model(nodes, {"x": [2, 3]}, outputs, {"w_q": w_q, "s": scale, "z": zp}, markers=False)


def test_transpose_of_a_weight_dequantize_is_folded_exactly() -> None:
    before = _transposed_weight_model()
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    out, results = apply(before, FoldWeightTransposePass(), FoldWeightTransposePass())
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "MatMul"]
    assert helper.get_attribute_value(out.graph.node[0].attribute[0]) == 1  # channel axis follows the transpose
    assert results[0].changes == 1 and not results[1].modified
    assert_valid(out)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])


def test_per_channel_scale_without_axis_gets_the_axis_it_moves_to() -> None:
    before = _transposed_weight_model(axis=False)  # default axis 1: one scale per column of w
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    out, _ = apply(before, FoldWeightTransposePass())
    assert helper.get_attribute_value(out.graph.node[0].attribute[0]) == 0
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])


def test_a_dequantize_read_by_another_node_is_left_alone() -> None:
    _, results = apply(_transposed_weight_model(extra_reader=True), FoldWeightTransposePass())
    assert not results[0].modified
