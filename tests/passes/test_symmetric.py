"""EnforceSymmetricPass: zero point 0 for weights, graph inputs and (on symmetric-only devices) activations."""

from __future__ import annotations

import numpy as np
import onnx

from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid, const, node, outputs_of, random_feed
from tiexport.passes.graph import dequantize
from tiexport.passes.symmetric import EnforceSymmetricPass
from tiexport.validators.validate import validate

S = 2.0**-7


def _activation(zp: int, dtype: str, relu: bool = False) -> onnx.ModelProto:
    """input -> [Relu] -> Q(s, zp) -> DQ -> Sigmoid -> output."""
    b = QdqBuilder(seed=0, name="act")
    x = b.input("input", [1, 64])
    if relu:
        x = b.relu(x)
    y = b.qdq(x, S, zp, dtype, name="act")
    b.output(b.node("Sigmoid", [y], name="sig"))
    return b.build()


def _qparams(model: onnx.ModelProto, name: str) -> tuple[float, np.ndarray]:
    n = node(model, name)
    return float(const(model, n.input[1])), const(model, n.input[2])


def _max_diff(a: onnx.ModelProto, b: onnx.ModelProto, lo: float = -1.5, hi: float = 1.5) -> float:
    feed = random_feed(a, seed=1, lo=lo, hi=hi)
    return float(np.abs(outputs_of(a, feed)[0] - outputs_of(b, feed)[0]).max())


def _dq_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with the activation DequantizeLinear's output as the graph output (no Sigmoid after it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.remove(node(m, "sig"))
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(node(m, "act_dq_DequantizeLinear").output[0],
                                                             onnx.TensorProto.FLOAT, [1, 64]))
    return m


def test_uint8_zero_point_128_becomes_int8_zero_point_0_exactly() -> None:
    model = _activation(128, "uint8")
    out, (res,) = apply(model, EnforceSymmetricPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    for name in ("act_q_QuantizeLinear", "act_dq_DequantizeLinear"):
        s, z = _qparams(out, name)
        assert s == S and z.dtype == np.int8 and z == 0
    assert_valid(out)
    assert _max_diff(model, out) == 0.0


def test_int8_zero_point_minus_128_becomes_uint8_zero_point_0_exactly() -> None:
    model = _activation(-128, "int8")
    out, (res,) = apply(model, EnforceSymmetricPass())
    assert res.modified and not res.numerics_changed
    s, z = _qparams(out, "act_q_QuantizeLinear")
    assert s == S and z.dtype == np.uint8 and z == 0
    assert _max_diff(model, out) == 0.0


def test_non_negative_tensor_becomes_uint8_zero_point_0() -> None:
    model = _dq_output(_activation(3, "uint8", relu=True))
    out, (res,) = apply(model, EnforceSymmetricPass())
    assert res.numerics_changed
    s, z = _qparams(out, "act_q_QuantizeLinear")
    assert z.dtype == np.uint8 and z == 0
    assert np.isclose(s, S * 252 / 255, rtol=1e-6)  # the old top of the range, 252 steps above 0
    assert_valid(out)
    # two roundings, each within half its own step
    assert _max_diff(model, out, lo=-1, hi=1.9) <= (S + s) / 2 * (1 + 1e-5)


def test_signed_tensor_becomes_int8_covering_both_ends() -> None:
    model = _dq_output(_activation(100, "uint8"))
    out, (res,) = apply(model, EnforceSymmetricPass())
    assert res.numerics_changed
    s, z = _qparams(out, "act_q_QuantizeLinear")
    assert z.dtype == np.int8 and z == 0
    assert np.isclose(s, S * max(155 / 127, 100 / 128), rtol=1e-6)
    lo, hi = -100 * S, 155 * S  # inside the old range nothing clips, so the error is two half-steps at most
    assert _max_diff(model, out, lo=lo, hi=hi) <= (S + s) / 2 * (1 + 1e-5)


def test_weight_zero_point_is_shifted_out_exactly() -> None:
    model = tiny_conv(w_zp=2, bias="none")
    out, (res,) = apply(model, EnforceSymmetricPass(activations=False))
    assert res.modified and not res.numerics_changed
    dq = node(out, "conv_weight_DequantizeLinear")
    assert not const(out, dq.input[2]).any()
    feed = random_feed(model, seed=2, lo=0, hi=1)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_weight_that_does_not_fit_int8_after_the_shift_is_requantized() -> None:
    b = QdqBuilder(seed=0, name="uint8_weight")
    x = b.input("input", [1, 4])
    wq = b.const(np.array([[0, 40, 200, 255]], np.uint8).T, "w_quantized")  # zp 10: codes up to 245 above it
    w = b.dequantize(wq, 0.01, 10, "uint8", name="w")
    b.output(b.node("MatMul", [x, w], name="mm"))
    model = b.build()
    out, (res,) = apply(model, EnforceSymmetricPass(activations=False))
    assert res.numerics_changed
    dq = node(out, "w_DequantizeLinear")
    q, s, z = (const(out, n) for n in dq.input)
    assert q.dtype == np.int8 and z == 0
    assert np.isclose(s, 2.45 / 127, rtol=1e-6)
    old = dequantize(const(model, "w_quantized"), 0.01, np.uint8(10))
    assert np.abs(dequantize(q, s, z) - old).max() <= s / 2 * (1 + 1e-6)


def test_without_activations_only_the_graph_input_quantizer_changes() -> None:
    model = tiny_conv(in_zp=10, act_zp=3)
    out, (res,) = apply(model, EnforceSymmetricPass(activations=False))
    assert res.changes == 1
    assert _qparams(out, "input_q_QuantizeLinear")[1] == 0
    assert _qparams(out, "relu_q_QuantizeLinear")[1] == 3
    assert not any(f.rule_id == "TIDL023" for f in validate(out, "AM68A").findings)


def test_validator_no_longer_flags_asymmetric_activations_on_tda4vm() -> None:
    model = tiny_conv(act_zp=3, in_zp=128)
    assert any(f.rule_id == "TIDL021" for f in validate(model, "TDA4VM").findings)
    out, _ = apply(model, EnforceSymmetricPass())
    assert not any(f.rule_id in ("TIDL021", "TIDL023") for f in validate(out, "TDA4VM").findings)


def test_quantize_output_that_is_a_graph_output_is_kept() -> None:
    b = QdqBuilder(seed=0, name="q_out")
    q = b.quantize(b.input("input", [1, 4]), S, 128, "uint8", name="act")
    b.output(q, onnx.TensorProto.UINT8, [1, 4])
    _out, (res,) = apply(b.build(), EnforceSymmetricPass())
    assert not res.modified and any("graph output" in n for n in res.notes)


def test_second_run_changes_nothing() -> None:
    model = tiny_conv(act_zp=3, in_zp=10, w_zp=2)
    _, (first, second) = apply(model, EnforceSymmetricPass(), EnforceSymmetricPass())
    assert first.changes == 3 and not second.modified
