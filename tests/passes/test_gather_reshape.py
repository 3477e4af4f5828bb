"""FoldIdentityGatherPass: Gather(Reshape(x, [-1]), arange(N) shaped S) -> Reshape(x, S), or x itself, exactly.

The dynamo exporter writes a layout-restoring ``aten.as_strided`` this way (timm's ConvNeXt head); left in, TIDL runs
the Gather on Arm (TIDL068) and the pool before it loses its requantization (TIDL014)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.export_helpers import model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.dead_nodes import RemoveDeadNodesPass
from tiexport.passes.gather_reshape import FoldIdentityGatherPass


def _gather_model(indices: np.ndarray, flat: list[int] | None = None, declared: bool = True) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Gather", ["f", "idx"], ["g"], axis=0),
             helper.make_node("Sigmoid", ["g"], ["y"])]
    m = model(nodes, {"x": [1, 4, 1, 2]}, {"y": list(indices.shape)},
              {"flat": np.array(flat or [-1], np.int64), "idx": indices.astype(np.int64)}, markers=False)
    if declared:
        m.graph.value_info.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1, 4, 1, 2]))
    return m


@pytest.mark.parametrize("declared", [True, False])
def test_in_order_gather_of_the_same_shape_is_dropped(declared: bool) -> None:
    before = _gather_model(np.arange(8).reshape(1, 4, 1, 2), declared=declared)
    x = np.random.default_rng(0).standard_normal((1, 4, 1, 2)).astype(np.float32)
    out, results = apply(before, FoldIdentityGatherPass(), RemoveDeadNodesPass(), FoldIdentityGatherPass())
    assert [n.op_type for n in out.graph.node] == ["Relu", "Sigmoid"]
    assert results[0].changes == 1 and not results[0].numerics_changed and not results[2].modified
    assert_valid(out)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])
    from tiexport.validators.validate import validate

    flagged = [f for f in validate(before, "AM68A").devices["AM68A"].findings if f.rule_id == "TIDL068"]
    assert flagged and all(f.fixable and "tiexport fix" in f.hint for f in flagged)
    assert not [f for f in validate(out, "AM68A").devices["AM68A"].findings if f.rule_id == "TIDL068"]


def test_in_order_gather_of_another_shape_becomes_a_reshape() -> None:
    before = _gather_model(np.arange(8).reshape(4, 2), flat=[8])
    x = np.random.default_rng(1).standard_normal((1, 4, 1, 2)).astype(np.float32)
    out, _ = apply(before, FoldIdentityGatherPass(), RemoveDeadNodesPass())
    assert [n.op_type for n in out.graph.node] == ["Relu", "Reshape", "Sigmoid"]
    assert_valid(out)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])


@pytest.mark.parametrize("indices", [np.arange(8)[::-1].reshape(1, 4, 1, 2).copy(), np.arange(6).reshape(1, 6),
                                     np.array([[0, 1, 2, 3, 4, 5, 6, 6]])])
def test_gathers_that_reorder_or_drop_elements_are_left_alone(indices: np.ndarray) -> None:
    _, results = apply(_gather_model(indices), FoldIdentityGatherPass())
    assert not results[0].modified


def _scalar_gather_model(index: int, axis: int = 1, opset: int = 17) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Gather", ["r", "idx"], ["g"], axis=axis),
             helper.make_node("Sigmoid", ["g"], ["y"])]
    dims = [1, 5, 4, 6]
    out = dims[: axis % 4] + dims[axis % 4 + 1:]
    return model(nodes, {"x": [1, 5, 4, 6]}, {"y": out}, {"idx": np.array(index, np.int64)}, opset=opset,
                 markers=False)


@pytest.mark.parametrize(("index", "axis", "opset"), [(0, 1, 17), (-1, 1, 17), (2, -1, 17), (3, 2, 11)])
def test_scalar_gather_becomes_slice_and_squeeze_exactly(index: int, axis: int, opset: int) -> None:
    """``x[:, 0]`` (a ViT's class token): TIDL gathers with 1-D indices only (TIDL068)."""
    from tiexport.passes.scalar_gather import ScalarGatherToSlicePass
    from tiexport.validators.validate import validate

    before = _scalar_gather_model(index, axis, opset)
    x = np.random.default_rng(3).standard_normal((1, 5, 4, 6)).astype(np.float32)
    out, results = apply(before, ScalarGatherToSlicePass(), ScalarGatherToSlicePass())
    assert [n.op_type for n in out.graph.node] == ["Relu", "Slice", "Squeeze", "Sigmoid"]
    assert results[0].changes == 1 and not results[0].numerics_changed and not results[1].modified
    assert_valid(out)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0])
    assert any(f.rule_id == "TIDL068" for f in validate(before, "AM68A").devices["AM68A"].findings)
    assert not any(f.rule_id == "TIDL068" for f in validate(out, "AM68A").devices["AM68A"].findings)


def test_gathers_of_index_lists_are_left_to_the_validator() -> None:
    from tiexport.passes.scalar_gather import ScalarGatherToSlicePass

    nodes = [helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)]
    m = model(nodes, {"x": [1, 5, 4]}, {"y": [1, 2, 4]}, {"idx": np.array([0, 3], np.int64)}, markers=False)
    _, results = apply(m, ScalarGatherToSlicePass())
    assert not results[0].modified
