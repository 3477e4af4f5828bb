"""ExpandQdqMarkersPass: export markers -> Q/DQ named after the module, weights stored int8, restricted ranges kept;
each expansion computes in ONNX Runtime exactly what torch's fake-quant computes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.passes.export_helpers import fake_quant, marker, model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.expand_markers import MARKER_DOMAIN, ExpandQdqMarkersPass


def _weight_model() -> onnx.ModelProto:
    w = np.array([[0.25, 100.0, -0.31], [0.5, -0.6, 0.05]], dtype=np.float32)  # 0.25/0.1 is a tie; 100 saturates
    nodes = [marker("w", "wq", "fc.weight_fake_quant", [0.1, 0.2], [0, 0], axis=0, qmin=-128, qmax=127),
             helper.make_node("Add", ["x", "wq"], ["y"])]
    return model(nodes, {"x": [2, 3]}, {"y": [2, 3]}, {"w": w})


def _act_model(qmin: int = 0, qmax: int = 255, axis: int = -1, scale: list[float] | None = None,
               zp: list[int] | None = None) -> onnx.ModelProto:
    return model([marker("x", "y", "layer1.act_fq", scale or [0.1], zp or [3], axis, qmin, qmax)], {"x": [1, 2, 4]},
                 {"y": [1, 2, 4]})


def _init(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == name))


def test_weight_site_is_stored_as_int8_rounded_half_to_even_and_saturated() -> None:
    out, _ = apply(_weight_model(), ExpandQdqMarkersPass())
    q = _init(out, "fc.weight_fake_quant.quantized")
    assert q.dtype == np.int8
    assert q.tolist() == [[2, 127, -3], [2, -3, 0]]
    assert "w" not in {i.name for i in out.graph.initializer}  # the float weight is gone


def test_weight_site_has_only_a_dequantize_named_after_the_module() -> None:
    expand = ExpandQdqMarkersPass()
    out, _ = apply(_weight_model(), expand)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Add"]
    assert out.graph.node[0].name == "fc.weight_fake_quant/DequantizeLinear"
    site = expand.sites[0]
    assert site.weight and site.quantize_node is None and site.axis == 0 and site.output == "wq"


def test_weight_site_dequantizes_to_torch_fake_quant_values() -> None:
    before = _weight_model()
    w = numpy_helper.to_array(before.graph.initializer[0])
    out, _ = apply(before, ExpandQdqMarkersPass())
    assert_valid(out)
    (y,) = outputs_of(out, {"x": np.zeros((2, 3), np.float32)})
    expected = fake_quant(w, np.array([[0.1], [0.2]], np.float32), np.zeros((2, 1)), -128, 127)
    np.testing.assert_array_equal(y, expected)


def test_activation_site_becomes_a_named_quantize_dequantize_pair() -> None:
    out, results = apply(_act_model(), ExpandQdqMarkersPass())
    assert [(n.op_type, n.name) for n in out.graph.node] == [
        ("QuantizeLinear", "layer1.act_fq/QuantizeLinear"), ("DequantizeLinear", "layer1.act_fq/DequantizeLinear")]
    assert list(out.graph.node[0].input[1:]) == ["layer1.act_fq.scale", "layer1.act_fq.zero_point"]
    assert results[0].changes == 1 and not results[0].numerics_changed


def test_activation_site_matches_torch_fake_quant_in_onnx_runtime() -> None:
    out, _ = apply(_act_model(), ExpandQdqMarkersPass())
    x = np.linspace(-2, 30, 8, dtype=np.float32).reshape(1, 2, 4)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], fake_quant(x, np.float32(0.1), 3, 0, 255))


def test_restricted_per_tensor_range_is_clipped_before_quantize_and_matches_torch() -> None:
    out, _ = apply(_act_model(qmin=0, qmax=15, zp=[0]), ExpandQdqMarkersPass())
    assert [n.op_type for n in out.graph.node] == ["Clip", "QuantizeLinear", "DequantizeLinear"]
    assert out.graph.node[0].name == "layer1.act_fq/Clip"
    x = np.linspace(-1, 4, 8, dtype=np.float32).reshape(1, 2, 4)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], fake_quant(x, np.float32(0.1), 0, 0, 15))


def test_restricted_per_channel_range_is_clipped_on_the_integers_and_matches_torch() -> None:
    out, _ = apply(_act_model(qmin=-8, qmax=7, axis=1, scale=[0.1, 0.2], zp=[0, 1]), ExpandQdqMarkersPass())
    assert [n.op_type for n in out.graph.node] == ["QuantizeLinear", "Clip", "DequantizeLinear"]
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(1, 2, 4)
    expected = fake_quant(x, np.array([0.1, 0.2], np.float32).reshape(1, 2, 1), np.array([0, 1]).reshape(1, 2, 1),
                          -8, 7)
    np.testing.assert_array_equal(outputs_of(out, {"x": x})[0], expected)


def test_second_site_of_one_module_gets_a_suffix_and_shares_its_parameters() -> None:
    nodes = [marker("x", "a", "shared_fq", [0.1], [0]), helper.make_node("Relu", ["a"], ["b"]),
             marker("b", "y", "shared_fq", [0.1], [0])]
    expand = ExpandQdqMarkersPass()
    out, _ = apply(model(nodes, {"x": [4]}, {"y": [4]}), expand)
    names = [n.name for n in out.graph.node if n.op_type == "QuantizeLinear"]
    assert names == ["shared_fq/QuantizeLinear", "shared_fq/QuantizeLinear_1"]
    assert sorted(i.name for i in out.graph.initializer) == ["shared_fq.scale", "shared_fq.zero_point"]
    assert [s.quantize_node for s in expand.sites] == names


def test_no_marker_domain_is_left_and_a_second_run_changes_nothing() -> None:
    expand = ExpandQdqMarkersPass()
    out, results = apply(_act_model(), expand, expand)
    assert MARKER_DOMAIN not in {imp.domain for imp in out.opset_import}
    assert results[0].modified and not results[1].modified and len(expand.sites) == 1
    assert_valid(out)


def test_a_graph_without_markers_is_left_alone() -> None:
    m = model([helper.make_node("Relu", ["x"], ["y"])], {"x": [3]}, {"y": [3]}, markers=False)
    _, results = apply(m, ExpandQdqMarkersPass())
    assert not results[0].modified
