"""AlignBiasScalePass: an integer bias DequantizeLinear becomes int32, zero point 0, scale s_in * s_w."""

from __future__ import annotations

import numpy as np
import onnx

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, const, node, outputs_of, random_feed
from tiexport.passes.bias_scale import AlignBiasScalePass
from tiexport.validators.validate import validate

S_IN = 2.0**-6


def _conv(bias_scale_factor: float = 2.0, quantized_input: bool = True, bias_dtype: str = "int32",
          bias_zp: int = 0) -> onnx.ModelProto:
    """input -> [Q/DQ] -> Conv(int8 per-channel weight, bias DQ at factor * s_in * s_w) -> output (float)."""
    b = QdqBuilder(seed=9, name="bias_scale")
    x = b.input("input", [1, 3, 6, 6])
    if quantized_input:
        x = b.qdq(x, S_IN, 0, "int8", name="input")
    w = b.weight(shape=(4, 3, 3, 3), per_channel=True, name="conv_weight")
    w_scale = next(t for t in b.inits if t.name == "conv_weight_scale")
    s = (onnx.numpy_helper.to_array(w_scale).astype(np.float64) * S_IN * bias_scale_factor).astype(np.float32)
    values = (b.rng.standard_normal(4) * 0.05).astype(np.float64)
    dtype = {"int32": np.int32, "int8": np.int8}[bias_dtype]
    lim = np.iinfo(dtype)
    q = np.clip(np.round(values / s) + bias_zp, lim.min, lim.max).astype(dtype)
    bq = b.const(q, "conv_bias_quantized")
    bias = b.dequantize(bq, s, np.full(4, bias_zp, dtype), bias_dtype, axis=0, name="conv_bias")
    b.output(b.conv(x, w, bias, pads=[1, 1, 1, 1], name="conv"))
    return b.build()


def test_requantizes_a_bias_on_the_wrong_scale() -> None:
    model = _conv(bias_scale_factor=2.0)
    out, (res,) = apply(model, AlignBiasScalePass())
    assert res.modified and res.changes == 1 and res.numerics_changed
    dq = node(out, "conv_bias_DequantizeLinear")
    w_scale = const(model, "conv_weight_scale").astype(np.float64)
    np.testing.assert_allclose(const(out, dq.input[1]), S_IN * w_scale, rtol=1e-6)
    assert const(out, dq.input[0]).dtype == np.int32


def test_requantized_bias_stays_within_half_a_new_step() -> None:
    model = _conv(bias_scale_factor=2.0)
    out, _ = apply(model, AlignBiasScalePass())
    assert_valid(out)
    step = const(out, node(out, "conv_bias_DequantizeLinear").input[1]).reshape(1, -1, 1, 1)
    feed = random_feed(model, seed=2)
    diff = np.abs(outputs_of(out, feed)[0] - outputs_of(model, feed)[0])
    assert np.all(diff <= step / 2 * (1 + 1e-4) + 1e-6)


def test_a_bias_already_on_the_grid_is_left_alone() -> None:
    _out, (res,) = apply(_conv(bias_scale_factor=1.0), AlignBiasScalePass())
    assert not res.modified


def test_int8_bias_with_zero_point_becomes_int32_exactly_when_the_scale_is_unknown() -> None:
    model = _conv(bias_scale_factor=1.0, quantized_input=False, bias_dtype="int8", bias_zp=3)
    out, (res,) = apply(model, AlignBiasScalePass())
    assert res.modified and not res.numerics_changed
    dq = node(out, "conv_bias_DequantizeLinear")
    assert const(out, dq.input[0]).dtype == np.int32 and not const(out, dq.input[2]).any()
    feed = random_feed(model, seed=0)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_validator_no_longer_flags_the_bias() -> None:
    model = _conv(bias_scale_factor=2.0)
    assert any(f.rule_id == "TIDL033" for f in validate(model, "AM68A").findings)
    out, _ = apply(model, AlignBiasScalePass())
    assert not any(f.rule_id == "TIDL033" for f in validate(out, "AM68A").findings)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_conv(bias_scale_factor=2.0), AlignBiasScalePass(), AlignBiasScalePass())
    assert first.modified and not second.modified
