"""RemoveIdentityPass: Identity and inference-mode Dropout disappear; graph outputs keep their names."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, op_types, outputs_of, random_feed
from tiexport.passes.identity import RemoveIdentityPass


def _with(op: str, at_output: bool = False, ratio: float | None = None):
    """input -> Q/DQ -> Relu -> <op> -> [Q/DQ] -> output."""
    b = QdqBuilder(seed=0, name=op.lower())
    x = b.qdq(b.input("input", [1, 4, 4]), 2.0**-6, 0, "int8", name="input")
    extra = [] if ratio is None else [b.const(np.float32(ratio), "ratio")]
    y = b.node(op, [b.relu(x), *extra], name=op.lower())
    if not at_output:
        y = b.qdq(y, 2.0**-5, 0, "uint8", name="out")
    b.output(y)
    return b.build()


def test_removes_identity() -> None:
    model = _with("Identity")
    out, (res,) = apply(model, RemoveIdentityPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    assert "Identity" not in op_types(out)
    assert_valid(out)


def test_removes_inference_dropout_exactly() -> None:
    model = _with("Dropout", ratio=0.5)  # training_mode defaults to off: Dropout copies its input
    out, _ = apply(model, RemoveIdentityPass())
    assert "Dropout" not in op_types(out)
    feed = random_feed(model, seed=3)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_identity_at_a_graph_output_hands_its_name_to_the_producer() -> None:
    model = _with("Identity", at_output=True)
    name = model.graph.output[0].name
    out, (res,) = apply(model, RemoveIdentityPass())
    assert res.modified and "Identity" not in op_types(out)
    assert out.graph.output[0].name == name
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert relu.output[0] == name
    feed = random_feed(model, seed=0)
    np.testing.assert_array_equal(outputs_of(model, feed)[0], outputs_of(out, feed)[0])


def test_identity_from_graph_input_to_graph_output_is_kept() -> None:
    b = QdqBuilder(seed=0, name="passthrough")
    b.output(b.node("Identity", [b.input("input", [1, 4])], name="id"), TensorProto.FLOAT, [1, 4])
    out, (res,) = apply(b.build(), RemoveIdentityPass())
    assert not res.modified and op_types(out) == ["Identity"] and res.notes


def test_dropout_whose_mask_is_used_is_kept() -> None:
    b = QdqBuilder(seed=0, name="mask")
    x = b.input("input", [1, 4])
    y, mask = b.node("Dropout", [x], n_out=2, name="dropout")
    b.output(y)
    b.output(mask, TensorProto.BOOL, [1, 4])
    out, (res,) = apply(b.build(), RemoveIdentityPass())
    assert "Dropout" in op_types(out) and any("mask" in n for n in res.notes)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_with("Identity"), RemoveIdentityPass(), RemoveIdentityPass())
    assert first.modified and not second.modified


def test_dropout_in_training_mode_is_kept() -> None:
    b = QdqBuilder(seed=0, name="training")
    x = b.input("input", [1, 4])
    y = b.node("Dropout", [x, b.const(np.float32(0.5), "ratio"), b.const(np.bool_(True), "training_mode")],
               name="dropout")
    b.output(y)
    out, (res,) = apply(b.build(), RemoveIdentityPass())
    assert "Dropout" in op_types(out) and any("training_mode is on" in n for n in res.notes)
