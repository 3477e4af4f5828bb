"""RemoveRedundantQdqPass: Q(DQ(x)) with the same parameters -> x, exactly."""

from __future__ import annotations

import numpy as np

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, node, op_types, outputs_of, random_feed
from tiexport.passes.redundant_qdq import RemoveRedundantQdqPass
from tiexport.validators.validate import validate


def _chain(second_scale: float = 2.0**-4, repeats: int = 1, relu_first: bool = True):
    """input -> Q/DQ -> Relu -> Q/DQ -> (Q/DQ again) x repeats -> output."""
    b = QdqBuilder(seed=0, name="chain")
    x = b.qdq(b.input("input", [1, 4, 4, 4]), 2.0**-6, 0, "int8", name="input")
    y = b.qdq(b.relu(x) if relu_first else x, 2.0**-4, 0, "uint8", name="relu")
    for i in range(repeats):
        y = b.qdq(y, second_scale, 0, "uint8", name=f"again{i}")
    b.output(y)
    return b.build()


def test_removes_requantization_with_the_same_parameters() -> None:
    model = _chain()
    out, (res,) = apply(model, RemoveRedundantQdqPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    assert op_types(out).count("QuantizeLinear") == 2 and op_types(out).count("DequantizeLinear") == 2
    # the surviving DequantizeLinear is the last one (it writes the graph output) and reads the first Q
    dq = node(out, "again0_dq_DequantizeLinear")
    assert dq.input[0] == node(out, "relu_q_QuantizeLinear").output[0]
    assert out.graph.output[0].name == model.graph.output[0].name


def test_outputs_are_bit_identical() -> None:
    model = _chain(repeats=3)
    out, _ = apply(model, RemoveRedundantQdqPass())
    assert_valid(out)
    feed = random_feed(model, seed=2, lo=-2, hi=2)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_collapses_chains_to_one_pair() -> None:
    out, (res,) = apply(_chain(repeats=3), RemoveRedundantQdqPass())
    assert res.changes == 3
    assert op_types(out) == ["QuantizeLinear", "DequantizeLinear", "Relu", "QuantizeLinear", "DequantizeLinear"]


def test_keeps_requantization_to_other_parameters() -> None:
    out, (res,) = apply(_chain(second_scale=2.0**-3), RemoveRedundantQdqPass())
    assert not res.modified
    assert op_types(out).count("QuantizeLinear") == 3


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_chain(repeats=2), RemoveRedundantQdqPass(), RemoveRedundantQdqPass())
    assert first.modified and not second.modified


def test_validator_no_longer_flags_it() -> None:
    model = _chain()
    assert any(f.rule_id == "TIDL031" for f in validate(model, "AM68A").findings)
    out, _ = apply(model, RemoveRedundantQdqPass())
    assert not any(f.rule_id == "TIDL031" for f in validate(out, "AM68A").findings)


def test_a_quantize_that_is_a_graph_output_is_kept() -> None:
    from onnx import TensorProto

    b = QdqBuilder(seed=0, name="q_is_output")
    x = b.qdq(b.input("input", [1, 4]), 2.0**-6, 0, "int8", name="input")
    q = b.quantize(x, 2.0**-6, 0, "int8", name="again")
    b.output(q, TensorProto.INT8, [1, 4])
    out, (res,) = apply(b.build(), RemoveRedundantQdqPass())
    assert not res.modified and any("graph output" in n for n in res.notes)
    assert op_types(out).count("QuantizeLinear") == 2
