"""The ONNX side of export (no torch): marker expansion into Q/DQ, weight folding, restricted ranges, naming, and the
clean-ups after the exporters (Identity, weight Transpose, ReduceMean, allowzero, opset/IR). Each rewrite is checked
for exactness in ONNX Runtime against numpy or against the graph before the rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tiexport.symbolics.postprocess import (
    expand_markers,
    finalize,
    fold_weight_transposes,
    reduce_mean_to_global_pool,
    remove_identities,
    reshape_without_allowzero,
    set_opset_and_ir,
)

DOMAIN = "tiexport"


def _marker(x: str, y: str, module: str, scale: list[float], zp: list[int], axis: int = -1, qmin: int = 0,
            qmax: int = 255) -> onnx.NodeProto:
    return helper.make_node("QuantizeDequantize", [x], [y], domain=DOMAIN, module=module, scale=scale,
                            zero_point=zp, axis=axis, quant_min=qmin, quant_max=qmax)


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], outputs: dict[str, list[int]],
           inits: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """torch's fake-quant numerics: clamp(round_half_even(x / s) + z, qmin, qmax) - z, times s."""
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


# ---------------------------------------------------------------------------------------------- marker expansion


def _weight_model() -> onnx.ModelProto:
    w = np.array([[0.25, 100.0, -0.31], [0.5, -0.6, 0.05]], dtype=np.float32)  # 0.25/0.1 is a tie; 100 saturates
    nodes = [_marker("w", "wq", "fc.weight_fake_quant", [0.1, 0.2], [0, 0], axis=0, qmin=-128, qmax=127),
             helper.make_node("Add", ["x", "wq"], ["y"])]
    return _model(nodes, {"x": [2, 3]}, {"y": [2, 3]}, {"w": w})


def test_weight_site_is_stored_as_int8_rounded_half_to_even_and_saturated():
    model = _weight_model()
    expand_markers(model)
    q = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc.weight_fake_quant.quantized"))
    assert q.dtype == np.int8
    assert q.tolist() == [[2, 127, -3], [2, -3, 0]]


def test_weight_site_has_only_a_dequantize_named_after_the_module():
    model = _weight_model()
    sites = expand_markers(model)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Add"]
    assert model.graph.node[0].name == "fc.weight_fake_quant/DequantizeLinear"
    assert sites[0].weight and sites[0].quantize_node is None and sites[0].axis == 0


def test_weight_site_dequantizes_to_torch_fake_quant_values():
    model = _weight_model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    expand_markers(model)
    (y,) = _run(model, {"x": np.zeros((2, 3), np.float32)})
    expected = _fake_quant(w, np.array([[0.1], [0.2]], np.float32), np.zeros((2, 1)), -128, 127)
    np.testing.assert_array_equal(y, expected)


def _act_model(qmin: int = 0, qmax: int = 255, axis: int = -1, scale: list[float] | None = None,
               zp: list[int] | None = None) -> onnx.ModelProto:
    scale = scale or [0.1]
    zp = zp or [3]
    return _model([_marker("x", "y", "layer1.act_fq", scale, zp, axis, qmin, qmax)], {"x": [1, 2, 4]},
                  {"y": [1, 2, 4]})


def test_activation_site_becomes_a_named_quantize_dequantize_pair():
    model = _act_model()
    expand_markers(model)
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("QuantizeLinear", "layer1.act_fq/QuantizeLinear"), ("DequantizeLinear", "layer1.act_fq/DequantizeLinear")]
    assert list(model.graph.node[0].input[1:]) == ["layer1.act_fq.scale", "layer1.act_fq.zero_point"]


def test_activation_site_matches_torch_fake_quant_in_onnx_runtime():
    model = _act_model()
    expand_markers(model)
    x = np.linspace(-2, 30, 8, dtype=np.float32).reshape(1, 2, 4)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], _fake_quant(x, np.float32(0.1), 3, 0, 255))


def test_restricted_per_tensor_range_is_clipped_before_quantize():
    model = _act_model(qmin=0, qmax=15, zp=[0])
    expand_markers(model)
    assert [n.op_type for n in model.graph.node] == ["Clip", "QuantizeLinear", "DequantizeLinear"]
    assert model.graph.node[0].name == "layer1.act_fq/Clip"


def test_restricted_per_tensor_range_matches_torch_fake_quant():
    model = _act_model(qmin=0, qmax=15, zp=[0])
    expand_markers(model)
    x = np.linspace(-1, 4, 8, dtype=np.float32).reshape(1, 2, 4)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], _fake_quant(x, np.float32(0.1), 0, 0, 15))


def test_restricted_per_channel_range_matches_torch_fake_quant():
    model = _act_model(qmin=-8, qmax=7, axis=1, scale=[0.1, 0.2], zp=[0, 1])
    expand_markers(model)
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "Clip", "DequantizeLinear"]
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(1, 2, 4)
    expected = _fake_quant(x, np.array([0.1, 0.2], np.float32).reshape(1, 2, 1), np.array([0, 1]).reshape(1, 2, 1),
                           -8, 7)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], expected)


def test_second_site_of_one_module_gets_a_suffix_and_shares_its_parameters():
    nodes = [_marker("x", "a", "shared_fq", [0.1], [0]), helper.make_node("Relu", ["a"], ["b"]),
             _marker("b", "y", "shared_fq", [0.1], [0])]
    model = _model(nodes, {"x": [4]}, {"y": [4]})
    expand_markers(model)
    names = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert names == ["shared_fq/QuantizeLinear", "shared_fq/QuantizeLinear_1"]
    assert [i.name for i in model.graph.initializer] == ["shared_fq.scale", "shared_fq.zero_point"]


def test_no_marker_domain_is_left_after_expansion():
    model = _act_model()
    expand_markers(model)
    assert DOMAIN not in {imp.domain for imp in model.opset_import}
    onnx.checker.check_model(model, full_check=True)


# ---------------------------------------------------------------------------------------------- clean-ups


def test_identity_is_removed_and_outputs_keep_their_names():
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Identity", ["b"], ["y"])]
    model = _model(nodes, {"x": [3]}, {"y": [3]}, opset=17)
    x = np.array([-1, 0, 2], np.float32)
    before = _run(model, {"x": x})
    assert remove_identities(model.graph) == 2
    assert [n.op_type for n in model.graph.node] == ["Relu"]
    assert model.graph.output[0].name == "y"
    np.testing.assert_array_equal(_run(model, {"x": x})[0], before[0])


def _transposed_weight_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w_q = rng.integers(-128, 128, size=(4, 3)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"], axis=0),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    inits = {"w_q": w_q, "s": np.array([0.1, 0.2, 0.3, 0.4], np.float32), "z": np.zeros(4, np.int8)}
    return _model(nodes, {"x": [2, 3]}, {"y": [2, 4]}, inits)


def test_transpose_of_a_weight_dequantize_is_folded_exactly():
    model = _transposed_weight_model()
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    assert fold_weight_transposes(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert helper.get_attribute_value(model.graph.node[0].attribute[0]) == 1  # channel axis follows the transpose
    np.testing.assert_array_equal(_run(model, {"x": x})[0], before)


def _reduce_mean_model(keepdims: int = 1) -> onnx.ModelProto:
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)]
    out = [1, 2, 1, 1] if keepdims else [1, 2]
    return _model(nodes, {"x": [1, 2, 4, 4]}, {"y": out}, {"axes": np.array([-1, -2], np.int64)}, opset=18)


def test_spatial_reduce_mean_becomes_global_average_pool_exactly():
    model = _reduce_mean_model()
    x = np.random.default_rng(2).standard_normal((1, 2, 4, 4)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    assert reduce_mean_to_global_pool(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool"]
    np.testing.assert_allclose(_run(model, {"x": x})[0], before, rtol=1e-6, atol=1e-7)


def test_reduce_mean_without_keepdims_is_left_alone():
    model = _reduce_mean_model(keepdims=0)
    assert reduce_mean_to_global_pool(model) == 0


def test_reshape_allowzero_is_dropped_when_the_shape_has_no_zero():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    model = _model(nodes, {"x": [2, 3]}, {"y": [3, 2]}, {"shape": np.array([3, 2], np.int64)})
    assert reshape_without_allowzero(model.graph) == 1
    assert not model.graph.node[0].attribute


def test_down_conversion_to_17_drops_attributes_17_does_not_know():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, noop_with_empty_axes=0)]
    model = _model(nodes, {"x": [1, 2, 3]}, {"y": [1, 1, 3]}, {"axes": np.array([1], np.int64)}, opset=18)
    model.opset_import.pop()  # no marker domain in this one
    out = set_opset_and_ir(model, 17)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 8
    assert {a.name for a in out.graph.node[0].attribute} == {"axes", "keepdims"}


def test_down_conversion_refuses_an_attribute_value_17_cannot_express():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, noop_with_empty_axes=1)]
    model = _model(nodes, {"x": [1, 2, 3]}, {"y": [1, 1, 3]}, {"axes": np.array([1], np.int64)}, opset=18)
    model.opset_import.pop()
    with pytest.raises(ValueError, match="noop_with_empty_axes"):
        set_opset_and_ir(model, 17)


def test_finalize_gives_a_model_that_passes_the_full_checker():
    model, sites = finalize(_weight_model(), 17)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and len(sites) == 1
    assert "w" not in {i.name for i in model.graph.initializer}  # the float weight is gone
