"""QuantizeBiasPass: float Conv/Gemm bias -> int32 + DequantizeLinear at scale s_in * s_w."""

from __future__ import annotations

import numpy as np
import onnx

from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid, const, node, outputs_of, random_feed
from tiexport.passes.quantize_bias import QuantizeBiasPass
from tiexport.validators.validate import validate

S_IN = 2.0**-6


def _conv(per_channel: bool, quantized_input: bool = True) -> onnx.ModelProto:
    """input -> [Q/DQ] -> Conv(int8 weight DQ, float bias) -> output (float, so the bias error shows unrounded)."""
    b = QdqBuilder(seed=7, name="conv_bias")
    x = b.input("input", [1, 3, 6, 6])
    if quantized_input:
        x = b.qdq(x, S_IN, 0, "int8", name="input")
    w = b.weight(shape=(4, 3, 3, 3), per_channel=per_channel, name="conv_weight")
    bias = b.const((b.rng.standard_normal(4) * 0.3).astype(np.float32), "conv_bias")
    b.output(b.conv(x, w, bias, pads=[1, 1, 1, 1], name="conv"))
    return b.build()


def _gemm() -> onnx.ModelProto:
    """Gemm with B [K, N] (transB=0) quantized per column: its channel axis is 1."""
    b = QdqBuilder(seed=8, name="gemm_bias")
    x = b.qdq(b.input("input", [1, 6]), S_IN, 0, "int8", name="input")
    w = b.weight(shape=(6, 5), per_channel=True, axis=1, name="fc_weight")
    bias = b.const((b.rng.standard_normal(5) * 0.3).astype(np.float32), "fc_bias")
    b.output(b.node("Gemm", [x, w, bias], name="fc"))
    return b.build()


def _weight_scale(model: onnx.ModelProto, dq_name: str) -> np.ndarray:
    return const(model, node(model, dq_name).input[1]).astype(np.float64)


def test_per_channel_bias_gets_int32_at_input_times_weight_scale() -> None:
    model = _conv(per_channel=True)
    out, (res,) = apply(model, QuantizeBiasPass())
    assert res.modified and res.changes == 1 and res.numerics_changed
    dq = node(out, "conv_bias_DequantizeLinear")
    assert dq.op_type == "DequantizeLinear"
    q, s, z = (const(out, n) for n in dq.input)
    assert q.dtype == np.int32 and z.dtype == np.int32 and not z.any()
    np.testing.assert_allclose(s, S_IN * _weight_scale(model, "conv_weight_DequantizeLinear"), rtol=1e-6)
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0
    np.testing.assert_array_equal(q, np.round(const(model, "conv_bias").astype(np.float64) / s.astype(np.float64)))


def test_names_follow_the_bias_tensor() -> None:
    out, _ = apply(_conv(per_channel=False), QuantizeBiasPass())
    dq = node(out, "conv_bias_DequantizeLinear")
    assert dq.output[0] == "conv_bias"  # Conv still reads a tensor named conv_bias
    assert node(out, "conv").input[2] == "conv_bias"
    assert dq.input[0] == "conv_bias_quantized"


def test_per_tensor_weight_gives_one_bias_scale() -> None:
    model = _conv(per_channel=False)
    out, _ = apply(model, QuantizeBiasPass())
    s = const(out, node(out, "conv_bias_DequantizeLinear").input[1])
    assert s.shape == ()
    assert float(s) == np.float32(S_IN * float(_weight_scale(model, "conv_weight_DequantizeLinear")))


def test_output_error_is_within_half_a_bias_step() -> None:
    model = _conv(per_channel=True)
    out, _ = apply(model, QuantizeBiasPass())
    assert_valid(out)
    step = const(out, node(out, "conv_bias_DequantizeLinear").input[1]).reshape(1, -1, 1, 1)
    feed = random_feed(model, seed=3)
    diff = np.abs(outputs_of(out, feed)[0] - outputs_of(model, feed)[0])
    assert diff.max() > 0  # the bias really moved to the grid
    assert np.all(diff <= step / 2 * (1 + 1e-4) + 1e-6)


def test_gemm_weight_quantized_per_column() -> None:
    model = _gemm()
    out, (res,) = apply(model, QuantizeBiasPass())
    assert res.changes == 1
    dq = node(out, "fc_bias_DequantizeLinear")
    s = const(out, dq.input[1])
    np.testing.assert_allclose(s, S_IN * _weight_scale(model, "fc_weight_DequantizeLinear"), rtol=1e-6)
    feed = random_feed(model, seed=1)
    diff = np.abs(outputs_of(out, feed)[0] - outputs_of(model, feed)[0])
    assert np.all(diff <= s.reshape(1, -1) / 2 * (1 + 1e-4) + 1e-6)


def test_unquantized_input_is_skipped_with_a_reason() -> None:
    _out, (res,) = apply(_conv(per_channel=True, quantized_input=False), QuantizeBiasPass())
    assert not res.modified
    assert any("input is not quantized" in n for n in res.notes)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_conv(per_channel=True), QuantizeBiasPass(), QuantizeBiasPass())
    assert first.modified and not second.modified


def test_validator_no_longer_reports_float_bias_once_quantized() -> None:
    model = tiny_conv(bias="float")
    assert any(f.rule_id == "TIDL033" and "float bias" in f.message for f in validate(model, "TDA4VM").findings)
    out, _ = apply(model, QuantizeBiasPass())
    assert not any(f.rule_id == "TIDL033" for f in validate(out, "TDA4VM").findings)
