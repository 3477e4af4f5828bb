"""RemoveDeadNodesPass: nodes that reach no graph output go; graph inputs stay."""

from __future__ import annotations

import numpy as np

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, op_types, outputs_of, random_feed
from tiexport.passes.dead_nodes import RemoveDeadNodesPass
from tiexport.validators.validate import validate


def _with_dead_branch():
    """input -> Q -> DQ -> Relu -> output, plus a second DQ of the same Q feeding a Sigmoid nobody reads."""
    b = QdqBuilder(seed=0, name="dead")
    x = b.input("input", [1, 4])
    b.input("unused", [1, 2])
    q = b.quantize(x, 2.0**-5, 0, "int8", name="input")
    b.output(b.relu(b.dequantize(q, 2.0**-5, 0, "int8", name="live")))
    b.node("Sigmoid", [b.dequantize(q, 2.0**-4, 0, "int8", name="dead")], name="dead_sigmoid")
    return b.build()


def test_removes_the_dead_branch() -> None:
    model = _with_dead_branch()
    out, (res,) = apply(model, RemoveDeadNodesPass())
    assert res.modified and res.changes == 2 and not res.numerics_changed
    assert op_types(out) == ["QuantizeLinear", "DequantizeLinear", "Relu"]
    assert_valid(out)


def test_keeps_unused_graph_inputs() -> None:
    out, _ = apply(_with_dead_branch(), RemoveDeadNodesPass())
    assert [i.name for i in out.graph.input] == ["input", "unused"]


def test_outputs_are_bit_identical() -> None:
    model = _with_dead_branch()
    out, _ = apply(model, RemoveDeadNodesPass())
    feed = random_feed(model, seed=5)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_validator_no_longer_flags_dead_qdq() -> None:
    model = _with_dead_branch()
    model.graph.node.remove(next(n for n in model.graph.node if n.name == "dead_sigmoid"))
    assert any(f.rule_id == "TIDL031" and "never used" in f.message for f in validate(model, "AM68A").findings)
    out, _ = apply(model, RemoveDeadNodesPass())
    assert not any(f.rule_id == "TIDL031" for f in validate(out, "AM68A").findings)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_with_dead_branch(), RemoveDeadNodesPass(), RemoveDeadNodesPass())
    assert first.modified and not second.modified
