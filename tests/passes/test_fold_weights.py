"""FoldWeightQuantizationPass: float weight -> Q -> DQ becomes int weight -> DQ, bit-exact with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid, const, node, op_types, outputs_of, random_feed, run_ort
from tiexport.passes.fold_weights import FoldWeightQuantizationPass
from tiexport.validators.validate import validate


def _ort_quantized(model: onnx.ModelProto, q_name: str) -> np.ndarray:
    """What ONNX Runtime's QuantizeLinear ``q_name`` produces in ``model`` (exposed as an extra output)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    q = next(n for n in m.graph.node if n.name == q_name)
    zp_type = next(t.data_type for t in m.graph.initializer if t.name == q.input[2])
    m.graph.output.append(helper.make_tensor_value_info(q.output[0], zp_type, None))
    return run_ort(m, random_feed(m))[q.output[0]]


def _gemm_model(per_channel_axis: int | None) -> onnx.ModelProto:
    """input[1, 6] -> Q/DQ -> Gemm(B = Q/DQ of a float [6, 5] weight, transB=0) -> output."""
    b = QdqBuilder(seed=3, name="gemm")
    x = b.qdq(b.input("input", [1, 6]), 2.0**-6, 0, "int8", name="input")
    w = b.weight(shape=(6, 5), per_channel=per_channel_axis is not None, axis=per_channel_axis or 0,
                 folded=False, name="fc_weight")
    b.output(b.node("Gemm", [x, w], name="fc"))
    return b.build()


def test_folds_per_tensor_weight_bit_exact_with_ort() -> None:
    model = tiny_conv(w_folded=False)
    expected = _ort_quantized(model, "conv_weight_q_QuantizeLinear")
    out, (res,) = apply(model, FoldWeightQuantizationPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    assert op_types(out).count("QuantizeLinear") == op_types(model).count("QuantizeLinear") - 1
    assert not any(n.name == "conv_weight_q_QuantizeLinear" for n in out.graph.node)
    dq = node(out, "conv_weight_dq_DequantizeLinear")
    folded = const(out, dq.input[0])
    assert folded.dtype == np.int8
    np.testing.assert_array_equal(folded, expected)


def test_folded_constant_takes_the_quantize_output_name() -> None:
    model = tiny_conv(w_folded=False)
    q_out = node(model, "conv_weight_q_QuantizeLinear").output[0]
    out, _ = apply(model, FoldWeightQuantizationPass())
    assert node(out, "conv_weight_dq_DequantizeLinear").input[0] == q_out
    assert q_out in {t.name for t in out.graph.initializer}


def test_folds_per_channel_weight_on_axis_1_bit_exact() -> None:
    model = _gemm_model(per_channel_axis=1)
    expected = _ort_quantized(model, "fc_weight_q_QuantizeLinear")
    out, _ = apply(model, FoldWeightQuantizationPass())
    dq = node(out, "fc_weight_dq_DequantizeLinear")
    np.testing.assert_array_equal(const(out, dq.input[0]), expected)
    assert op_types(out).count("QuantizeLinear") == 1


def test_rounding_ties_go_to_even_as_in_ort() -> None:
    # weights exactly halfway between two grid points: x / s = k + 0.5
    b = QdqBuilder(seed=0, name="ties")
    x = b.input("input", [1, 8])
    s = 2.0**-4
    w = (np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5]], np.float32) * s).T.copy()  # [8, 1]
    wf = b.const(w, "w")
    wq = b.dequantize(b.quantize(wf, s, 0, "int8", name="w_q"), s, 0, "int8", name="w_dq")
    b.output(b.node("MatMul", [x, wq], name="mm"))
    model = b.build()
    expected = _ort_quantized(model, "w_q_QuantizeLinear")
    out, _ = apply(model, FoldWeightQuantizationPass())
    folded = const(out, node(out, "w_dq_DequantizeLinear").input[0])
    np.testing.assert_array_equal(folded, expected)
    np.testing.assert_array_equal(folded.ravel(), [0, 2, 2, 0, -2, -2, 126, -128])


def test_outputs_stay_bit_identical() -> None:
    model = _gemm_model(per_channel_axis=None)
    out, _ = apply(model, FoldWeightQuantizationPass())
    assert_valid(out)
    feed = random_feed(model, seed=1)
    for a, b in zip(outputs_of(model, feed), outputs_of(out, feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_second_run_changes_nothing() -> None:
    _out, (first, second) = apply(tiny_conv(w_folded=False), FoldWeightQuantizationPass(), FoldWeightQuantizationPass())
    assert first.modified and not second.modified and second.changes == 0


def test_validator_no_longer_flags_unfolded_weights() -> None:
    model = tiny_conv(w_folded=False)
    assert any(f.rule_id == "TIDL030" for f in validate(model, "AM68A").findings)
    out, _ = apply(model, FoldWeightQuantizationPass())
    assert not any(f.rule_id == "TIDL030" for f in validate(out, "AM68A").findings)


def test_quantize_feeding_a_graph_output_is_kept_with_a_note() -> None:
    b = QdqBuilder(seed=0, name="q_out")
    b.input("input", [1, 2])
    wq = b.quantize(b.const(np.array([0.25, -0.5], np.float32), "w"), 2.0**-6, 0, "int8", name="w_q")
    b.output(wq, TensorProto.INT8, [2])
    out, (res,) = apply(b.build(), FoldWeightQuantizationPass())
    assert not res.modified
    assert op_types(out) == ["QuantizeLinear"]
    assert any("graph output" in n for n in res.notes)
