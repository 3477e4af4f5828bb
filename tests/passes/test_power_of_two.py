"""EnforcePowerOfTwoScalesPass: every scale 2**k; weights and biases requantized; zero points kept."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid, const, node, outputs_of, random_feed
from tiexport.errors import UsageError
from tiexport.passes.graph import dequantize
from tiexport.passes.power_of_two import EnforcePowerOfTwoScalesPass
from tiexport.tidl_spec import is_power_of_two
from tiexport.tidl_spec import round_to_power_of_two as power_of_two
from tiexport.validators.validate import validate

S = 0.0123


def _activation(zp: int = 0, dtype: str = "uint8") -> onnx.ModelProto:
    """input -> Q/DQ(S, zp) -> output."""
    b = QdqBuilder(seed=0, name="act")
    b.output(b.qdq(b.input("input", [1, 256]), S, zp, dtype, name="act"))
    return b.build()


def test_power_of_two_rounds_up_by_default() -> None:
    np.testing.assert_array_equal(power_of_two(np.array([0.0123, 0.25, 0.3, 1e-6])),
                                  np.float32([2.0**-6, 0.25, 0.5, 2.0**-19]))


def test_power_of_two_nearest_rounds_log2_to_nearest() -> None:
    np.testing.assert_array_equal(power_of_two(np.array([0.0123, 0.3, 0.36]), "nearest"),
                                  np.float32([2.0**-6, 0.25, 0.5]))


def test_is_power_of_two() -> None:
    assert list(is_power_of_two(np.array([0.25, 0.3, -0.25, 0.0, np.nan]))) == [True, False, False, False, False]


def test_activation_scale_rounded_up_and_zero_point_kept() -> None:
    out, (res,) = apply(_activation(zp=3), EnforcePowerOfTwoScalesPass())
    assert res.modified and res.changes == 2 and res.numerics_changed
    for name in ("act_q_QuantizeLinear", "act_dq_DequantizeLinear"):
        n = node(out, name)
        assert float(const(out, n.input[1])) == 2.0**-6
        assert int(const(out, n.input[2])) == 3
    assert_valid(out)


def test_activation_error_is_within_the_new_step() -> None:
    model = _activation()
    out, _ = apply(model, EnforcePowerOfTwoScalesPass())
    feed = random_feed(model, seed=2, lo=0, hi=255 * S)
    diff = np.abs(outputs_of(model, feed)[0] - outputs_of(out, feed)[0])
    assert diff.max() > 0
    assert diff.max() <= 2.0**-6 * (1 + 1e-6)  # two roundings, at most half of each step (S < 2**-6)


def test_nearest_mode_can_round_down() -> None:
    b = QdqBuilder(seed=0, name="act")
    b.output(b.qdq(b.input("input", [1, 8]), 0.3, 0, "int8", name="act"))
    out, _ = apply(b.build(), EnforcePowerOfTwoScalesPass("nearest"))
    assert float(const(out, node(out, "act_q_QuantizeLinear").input[1])) == 0.25


def test_weights_are_requantized_to_the_new_scale() -> None:
    model = tiny_conv(w_p2=False, w_per_channel=True, bias="none")
    out, _ = apply(model, EnforcePowerOfTwoScalesPass())
    dq_old, dq_new = node(model, "conv_weight_DequantizeLinear"), node(out, "conv_weight_DequantizeLinear")
    s_new = const(out, dq_new.input[1])
    assert np.all(is_power_of_two(s_new))
    w_old = dequantize(*(const(model, n) for n in dq_old.input), axis=0)
    w_new = dequantize(*(const(out, n) for n in dq_new.input), axis=0)
    assert np.all(np.abs(w_new - w_old) <= s_new.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))


def test_already_power_of_two_model_is_untouched() -> None:
    _, (res,) = apply(tiny_conv(), EnforcePowerOfTwoScalesPass())
    assert not res.modified


def test_validator_no_longer_flags_scales_on_tda4vm() -> None:
    model = tiny_conv(act_scale=0.03, w_p2=False)
    assert any(f.rule_id == "TIDL020" for f in validate(model, "TDA4VM").findings)
    out, _ = apply(model, EnforcePowerOfTwoScalesPass())
    assert not any(f.rule_id == "TIDL020" for f in validate(out, "TDA4VM").findings)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(tiny_conv(act_scale=0.03), EnforcePowerOfTwoScalesPass(),
                               EnforcePowerOfTwoScalesPass())
    assert first.modified and not second.modified


def test_unknown_mode_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="ceil"):
        EnforcePowerOfTwoScalesPass("floor")  # type: ignore[arg-type]
