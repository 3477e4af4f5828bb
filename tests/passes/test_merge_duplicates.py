"""MergeDuplicateQdqPass: Q or DQ nodes reading the same tensor with the same parameters become one."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, node, op_types, outputs_of, random_feed
from tiexport.passes.merge_duplicates import MergeDuplicateQdqPass
from tiexport.validators.validate import validate


def _two_branches(second_scale: float = 2.0**-6):
    """input -> Q -> DQ, DQ' (duplicate when second_scale matches) -> Relu / Sigmoid -> Add -> output."""
    b = QdqBuilder(seed=0, name="dups")
    x = b.input("input", [1, 4, 4, 4])
    q = b.quantize(x, 2.0**-6, 0, "int8", name="input")
    d1 = b.dequantize(q, 2.0**-6, 0, "int8", name="branch1")
    d2 = b.dequantize(q, second_scale, 0, "int8", name="branch2")
    b.output(b.node("Add", [b.relu(d1), b.node("Sigmoid", [d2])], name="add"))
    return b.build()


def test_merges_duplicate_dequantize_into_the_first() -> None:
    model = _two_branches()
    out, (res,) = apply(model, MergeDuplicateQdqPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    assert op_types(out).count("DequantizeLinear") == 1
    kept = node(out, "branch1_DequantizeLinear")
    assert node(out, "sigmoid").input[0] == kept.output[0]
    assert not any(n.name == "branch2_DequantizeLinear" for n in out.graph.node)


def test_outputs_are_bit_identical() -> None:
    model = _two_branches()
    out, _ = apply(model, MergeDuplicateQdqPass())
    assert_valid(out)
    feed = random_feed(model, seed=4, lo=-3, hi=3)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_different_parameters_are_not_merged() -> None:
    out, (res,) = apply(_two_branches(second_scale=2.0**-5), MergeDuplicateQdqPass())
    assert not res.modified and op_types(out).count("DequantizeLinear") == 2


def test_merges_duplicate_quantize_nodes() -> None:
    b = QdqBuilder(seed=0, name="dup_q")
    x = b.input("input", [1, 8])
    y1 = b.qdq(x, 2.0**-5, 0, "int8", name="a")
    y2 = b.qdq(x, 2.0**-5, 0, "int8", name="b")
    b.output(b.node("Add", [y1, y2], name="add"))
    model = b.build()
    out, (res,) = apply(model, MergeDuplicateQdqPass())
    # first the two Q nodes merge; the DQ nodes then read the same tensor and merge too (same run)
    assert res.changes == 2
    assert op_types(out) == ["QuantizeLinear", "DequantizeLinear", "Add"]
    feed = random_feed(model, seed=1)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_two_branches(), MergeDuplicateQdqPass(), MergeDuplicateQdqPass())
    assert first.modified and not second.modified


def test_validator_no_longer_flags_duplicates() -> None:
    model = _two_branches()
    assert any(f.rule_id == "TIDL031" and "duplicate" in f.message for f in validate(model, "AM68A").findings)
    out, _ = apply(model, MergeDuplicateQdqPass())
    assert not any(f.rule_id == "TIDL031" for f in validate(out, "AM68A").findings)


def test_duplicate_writing_a_graph_output_is_kept() -> None:
    b = QdqBuilder(seed=0, name="dup_out")
    x = b.input("input", [1, 8])
    q = b.quantize(x, 2.0**-5, 0, "int8", name="a")
    d1 = b.dequantize(q, 2.0**-5, 0, "int8", name="d1")
    d2 = b.dequantize(q, 2.0**-5, 0, "int8", name="d2")
    b.output(b.relu(d1))
    b.output(d2, TensorProto.FLOAT, [1, 8])
    _out, (res,) = apply(b.build(), MergeDuplicateQdqPass())
    assert not res.modified and any("graph output" in n for n in res.notes)
