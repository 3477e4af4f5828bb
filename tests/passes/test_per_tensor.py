"""ConvertPerChannelToPerTensorPass: one weight scale per tensor, covering every channel's range."""

from __future__ import annotations

import numpy as np
import onnx

from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid, const, node, outputs_of, random_feed
from tiexport.passes.graph import dequantize
from tiexport.passes.per_tensor import ConvertPerChannelToPerTensorPass
from tiexport.tidl_spec import PER_TENSOR_WEIGHT_OPS
from tiexport.validators.validate import validate


def _pointwise(scales_equal: bool = False) -> onnx.ModelProto:
    """input[1, 6, 4, 4] -> Conv 1x1 (int8 weight per output channel) -> output (float)."""
    b = QdqBuilder(seed=11, name="pointwise")
    x = b.input("input", [1, 6, 4, 4])
    w = b.rng.standard_normal((5, 6, 1, 1)).astype(np.float32) * np.array([0.1, 0.5, 1.0, 2.0, 0.05],
                                                                             np.float32).reshape(5, 1, 1, 1)
    if scales_equal:
        w = np.clip(w, -0.5, 0.5)
        w[:, 0] = 0.5  # every channel reaches the same max |w|, so the per-channel scales are equal
    b.output(b.conv(x, b.weight(w, per_channel=True, name="pw_weight"), name="pw"))
    return b.build()


def _weight(model: onnx.ModelProto) -> np.ndarray:
    dq = node(model, "pw_weight_DequantizeLinear")
    q, s, z = (const(model, n) for n in dq.input)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if s.ndim else 0
    return dequantize(q, s, z, axis=axis)


def test_per_channel_weight_becomes_per_tensor() -> None:
    out, (res,) = apply(_pointwise(), ConvertPerChannelToPerTensorPass())
    assert res.modified and res.changes == 1 and res.numerics_changed
    dq = node(out, "pw_weight_DequantizeLinear")
    assert const(out, dq.input[1]).shape == () and const(out, dq.input[2]).shape == ()
    assert not any(a.name == "axis" for a in dq.attribute)
    assert_valid(out)


def test_new_scale_covers_the_widest_channel_without_clipping() -> None:
    model = _pointwise()
    out, _ = apply(model, ConvertPerChannelToPerTensorPass())
    s = float(const(out, node(out, "pw_weight_DequantizeLinear").input[1]))
    w_old, w_new = _weight(model), _weight(out)
    assert s == np.float32(np.abs(w_old).max() / 127)
    assert np.abs(w_new - w_old).max() <= s / 2 * (1 + 1e-6)


def test_output_error_is_bounded_by_half_a_new_step_per_weight() -> None:
    model = _pointwise()
    out, _ = apply(model, ConvertPerChannelToPerTensorPass())
    s = float(const(out, node(out, "pw_weight_DequantizeLinear").input[1]))
    feed = random_feed(model, seed=6)
    diff = np.abs(outputs_of(out, feed)[0] - outputs_of(model, feed)[0])
    # a 1x1 conv: each output sums 6 input * weight products, each weight off by at most s / 2
    bound = np.abs(feed["input"]).sum(axis=1, keepdims=True) * s / 2
    assert diff.max() > 0
    assert np.all(diff <= bound * (1 + 1e-5) + 1e-6)


def test_equal_channel_scales_convert_exactly() -> None:
    model = _pointwise(scales_equal=True)
    out, (res,) = apply(model, ConvertPerChannelToPerTensorPass())
    assert res.modified and not res.numerics_changed
    feed = random_feed(model, seed=1)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_op_filter_leaves_conv_weights_per_channel() -> None:
    out, (res,) = apply(_pointwise(), ConvertPerChannelToPerTensorPass(ops=PER_TENSOR_WEIGHT_OPS))
    assert not res.modified
    assert const(out, node(out, "pw_weight_DequantizeLinear").input[1]).shape == (5,)


def test_op_filter_converts_conv_transpose_weights() -> None:
    b = QdqBuilder(seed=2, name="deconv")
    x = b.qdq(b.input("input", [1, 4, 4, 4]), 2.0**-6, 0, "int8", name="input")
    w = b.weight(shape=(4, 3, 2, 2), per_channel=True, axis=1, name="up_weight")
    b.output(b.node("ConvTranspose", [x, w], name="up", strides=[2, 2], kernel_shape=[2, 2]))
    out, (res,) = apply(b.build(), ConvertPerChannelToPerTensorPass(ops=PER_TENSOR_WEIGHT_OPS))
    assert res.changes == 1
    assert const(out, node(out, "up_weight_DequantizeLinear").input[1]).shape == ()
    assert_valid(out)


def test_validator_no_longer_flags_per_channel_on_tda4vm() -> None:
    model = tiny_conv(w_per_channel=True, bias="none")
    assert any(f.rule_id == "TIDL022" for f in validate(model, "TDA4VM").findings)
    out, _ = apply(model, ConvertPerChannelToPerTensorPass())
    assert not any(f.rule_id == "TIDL022" for f in validate(out, "TDA4VM").findings)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_pointwise(), ConvertPerChannelToPerTensorPass(), ConvertPerChannelToPerTensorPass())
    assert first.modified and not second.modified
