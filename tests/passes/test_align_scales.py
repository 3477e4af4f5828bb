"""AlignConcatScalesPass: the quantized inputs of a Concat (and an Add, when asked) share one grid."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from fixtures.builders import QdqBuilder
from tests.passes.helpers import apply, assert_valid, const, op_types, outputs_of, random_feed
from tiexport.passes.align_scales import AlignConcatScalesPass
from tiexport.validators.validate import validate

S1, S2 = 2.0**-6, 0.0203


def _two_inputs(op: str = "Concat", zp1: int = 0, zp2: int = 0) -> onnx.ModelProto:
    """a -> Q/DQ(S1, zp1) ; b -> Q/DQ(S2, zp2) ; <op>(a, b) -> output (float)."""
    b = QdqBuilder(seed=0, name="align")
    x1 = b.qdq(b.input("a", [1, 4, 2, 2]), S1, zp1, "uint8", name="a")
    x2 = b.qdq(b.input("b", [1, 4, 2, 2]), S2, zp2, "uint8", name="b")
    attrs = {"axis": 1} if op == "Concat" else {}
    b.output(b.node(op, [x1, x2], name=op.lower(), **attrs))
    return b.build()


def _scales(model: onnx.ModelProto) -> dict[str, float]:
    return {n.name: float(const(model, n.input[1])) for n in model.graph.node if n.op_type.endswith("Linear")}


def test_concat_inputs_take_the_largest_scale() -> None:
    out, (res,) = apply(_two_inputs(), AlignConcatScalesPass())
    assert res.modified and res.changes == 1 and res.numerics_changed
    assert set(_scales(out).values()) == {np.float32(S2)}  # both Q and both DQ nodes
    assert_valid(out)


def test_aligned_concat_error_is_within_the_new_step() -> None:
    model = _two_inputs()
    out, _ = apply(model, AlignConcatScalesPass())
    feed = random_feed(model, seed=3, lo=0.0, hi=255 * S1)  # inside both old ranges: no clipping anywhere
    diff = np.abs(outputs_of(model, feed)[0] - outputs_of(out, feed)[0])
    assert diff.max() > 0
    assert diff.max() <= (S1 + S2) / 2 * (1 + 1e-5)


def test_add_is_left_alone_unless_asked() -> None:
    out, (res,) = apply(_two_inputs("Add"), AlignConcatScalesPass())
    assert not res.modified
    out, (res,) = apply(_two_inputs("Add"), AlignConcatScalesPass(add=True))
    assert res.modified and set(_scales(out).values()) == {np.float32(S2)}


def test_different_zero_points_share_one_grid_and_keep_the_absorbed_relu() -> None:
    # input a is quantized uint8 zp 0: its grid clips negatives, the Relu an exporter folded away
    model = _two_inputs(zp1=0, zp2=128)
    out, (res,) = apply(model, AlignConcatScalesPass())
    assert res.modified
    params = {(float(const(out, n.input[1])), int(const(out, n.input[2]))) for n in out.graph.node
              if n.op_type.endswith("Linear")}
    assert len(params) == 1
    assert op_types(out).count("Relu") == 1
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert relu.name == "a_q_QuantizeLinear_Relu" and relu.input[0] == "a"
    assert_valid(out)
    (s, _), = params
    feed = random_feed(model, seed=4, lo=-1.5, hi=1.5)
    a_old, a_new = outputs_of(model, feed)[0][:, :4], outputs_of(out, feed)[0][:, :4]
    assert np.all(a_new[feed["a"] < 0] == 0)  # negatives still clip to 0
    inside = feed["a"] <= 255 * S1
    assert np.abs(a_old - a_new)[inside].max() <= (S1 + s) / 2 * (1 + 1e-5)


def test_input_without_its_own_quantizer_is_skipped_with_a_reason() -> None:
    b = QdqBuilder(seed=0, name="no_q")
    x1 = b.dequantize(b.input("a_int", [1, 4], TensorProto.INT8), S1, 0, "int8", name="a")
    x2 = b.qdq(b.input("b", [1, 4]), S2, 0, "int8", name="b")
    b.output(b.node("Concat", [x1, x2], name="concat", axis=1))
    _out, (res,) = apply(b.build(), AlignConcatScalesPass())
    assert not res.modified and any("without a QuantizeLinear" in n for n in res.notes)


def test_validator_no_longer_flags_concat_scales() -> None:
    model = _two_inputs()
    assert any(f.rule_id == "TIDL032" for f in validate(model, "AM68A").findings)
    out, _ = apply(model, AlignConcatScalesPass())
    assert not any(f.rule_id == "TIDL032" for f in validate(out, "AM68A").findings)


def test_second_run_changes_nothing() -> None:
    _, (first, second) = apply(_two_inputs(zp2=128), AlignConcatScalesPass(), AlignConcatScalesPass())
    assert first.modified and not second.modified
