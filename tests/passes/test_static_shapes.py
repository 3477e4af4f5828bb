"""PinInputShapesPass and InferShapesPass: static inputs, then a shape on every tensor."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid, outputs_of, random_feed
from tiexport.errors import UsageError
from tiexport.passes.static_shapes import InferShapesPass, PinInputShapesPass, parse_input_shape
from tiexport.validators.validate import validate


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_dynamic_batch_alone_is_pinned_to_1() -> None:
    out, (res,) = apply(tiny_conv(batch="N"), PinInputShapesPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    assert _dims(out.graph.input[0]) == [1, 3, 8, 8]


def test_given_shape_is_applied() -> None:
    model = tiny_conv(batch="N", size="H")
    out, _ = apply(model, PinInputShapesPass({"input": [2, 3, 8, 8]}))
    assert _dims(out.graph.input[0]) == [2, 3, 8, 8]


def test_other_dynamic_dims_are_not_guessed() -> None:
    _out, (res,) = apply(tiny_conv(batch="N", size="H"), PinInputShapesPass())
    assert not res.modified


def test_unknown_input_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"no input named 'image'.*inputs: input"):
        apply(tiny_conv(), PinInputShapesPass({"image": [1, 3, 8, 8]}))


def test_wrong_rank_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="rank 3"):
        apply(tiny_conv(batch="N"), PinInputShapesPass({"input": [3, 8, 8]}))


def test_contradicting_a_fixed_dimension_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="dimension 1 is fixed to 3"):
        apply(tiny_conv(batch="N"), PinInputShapesPass({"input": [1, 4, 8, 8]}))


def test_parse_input_shape() -> None:
    assert parse_input_shape("input:1x3x224x224") == ("input", [1, 3, 224, 224])
    assert parse_input_shape("ns:x:1x2") == ("ns:x", [1, 2])
    for bad in ("input", "input:", "input:1xAx2", "input:1x0x2", ":1x2"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)


def test_inference_gives_every_tensor_a_static_shape_after_pinning() -> None:
    model = tiny_conv(batch="N")
    out, (_, res) = apply(model, PinInputShapesPass(), InferShapesPass())
    assert res.modified
    for vi in (*out.graph.value_info, *out.graph.output):
        assert all(isinstance(d, int) and d > 0 for d in _dims(vi)), vi.name
    assert _dims(out.graph.output[0]) == [1, 4, 8, 8]
    assert_valid(out)
    assert not [f for f in validate(out, "AM68A").findings if f.category == "static_shape"]


def test_pinned_model_computes_the_same_values() -> None:
    model = tiny_conv(batch="N")
    out, _ = apply(model, PinInputShapesPass(), InferShapesPass())
    feed = random_feed(out, seed=1, lo=0, hi=1)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_second_inference_changes_nothing() -> None:
    _, (_, first, second) = apply(tiny_conv(batch="N"), PinInputShapesPass(), InferShapesPass(), InferShapesPass())
    assert first.modified and not second.modified


def test_second_pin_changes_nothing() -> None:
    _, (first, second) = apply(tiny_conv(batch="N"), PinInputShapesPass(), PinInputShapesPass())
    assert first.modified and not second.modified
