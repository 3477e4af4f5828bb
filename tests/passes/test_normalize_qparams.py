"""NormalizeQdqParamsPass: one-element scales/zero points become scalars of matching shape, without an axis."""

from __future__ import annotations

import numpy as np
import onnx

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, const, node, outputs_of, random_feed
from tiexport.passes.normalize_qparams import NormalizeQdqParamsPass
from tiexport.validators.validate import validate


def _ort_style_bias() -> onnx.ModelProto:
    """A Conv whose int32 bias DQ has a [1] scale, a scalar zero point and axis=1, as ONNX Runtime writes them."""
    b = QdqBuilder(seed=5, name="ort_bias")
    x = b.qdq(b.input("input", [1, 3, 6, 6]), 2.0**-6, 0, "int8", name="input")
    w = b.weight(shape=(4, 3, 3, 3), per_channel=False, name="conv_weight")
    s_w = float(onnx.numpy_helper.to_array(next(t for t in b.inits if t.name == "conv_weight_scale")))
    bq = b.const(np.array([5, -9, 120, 0], np.int32), "conv_bias_quantized")
    s = b.const(np.array([2.0**-6 * s_w], np.float32), "conv_bias_scale")
    z = b.const(np.int32(0), "conv_bias_zero_point")
    bias = b.node("DequantizeLinear", [bq, s, z], name="conv_bias_DequantizeLinear", axis=1)
    b.output(b.conv(x, w, bias, pads=[1, 1, 1, 1], name="conv"))
    return b.build()


def test_one_element_parameters_become_scalars() -> None:
    out, (res,) = apply(_ort_style_bias(), NormalizeQdqParamsPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    dq = node(out, "conv_bias_DequantizeLinear")
    assert const(out, dq.input[1]).shape == () and const(out, dq.input[2]).shape == ()
    assert not any(a.name == "axis" for a in dq.attribute)
    assert_valid(out)


def test_outputs_are_bit_identical() -> None:
    model = _ort_style_bias()
    out, _ = apply(model, NormalizeQdqParamsPass())
    feed = random_feed(model, seed=3)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_validator_no_longer_flags_the_shapes() -> None:
    model = _ort_style_bias()
    assert any(f.rule_id == "TIDL011" for f in validate(model, "AM68A").findings)
    out, _ = apply(model, NormalizeQdqParamsPass())
    assert not any(f.rule_id == "TIDL011" for f in validate(out, "AM68A").findings)


def test_per_channel_parameters_are_left_alone() -> None:
    b = QdqBuilder(seed=1, name="pc")
    x = b.qdq(b.input("input", [1, 3, 4, 4]), 2.0**-6, 0, "int8", name="input")
    b.output(b.conv(x, b.weight(shape=(4, 3, 1, 1), per_channel=True, name="w"), name="conv"))
    _, (res,) = apply(b.build(), NormalizeQdqParamsPass())
    assert not res.modified


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_ort_style_bias(), NormalizeQdqParamsPass(), NormalizeQdqParamsPass())
    assert first.modified and not second.modified
