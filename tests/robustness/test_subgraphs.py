"""Q/DQ inside If branches and Loop bodies (issue 18, item 10): a DequantizeLinear read only inside the branches is
used, not dead (TIDL031 said "never used" and called it fixable), and the Q/DQ parameters inside subgraphs are
checked (TIDL011) with the node named by where it sits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import tiexport
from fixtures.models import tiny_conv
from tests.robustness.helpers import assert_loadable
from tiexport.context import ModelContext, outer_references, subgraph_contexts
from tiexport.onnx_io import as_model


def branching(inner_scale: float = 2.0**-4) -> onnx.ModelProto:
    """tiny_conv -> Q -> DQ (``odq``, read only inside the branches) -> If(then: Q/DQ at ``inner_scale``, else:
    Identity)."""
    m = tiny_conv()
    out = m.graph.output[0]
    shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
    m.graph.node.append(helper.make_node("QuantizeLinear", [out.name, "relu_q_scale", "relu_q_zero_point"], ["oq"],
                                         name="out_q"))
    m.graph.node.append(helper.make_node("DequantizeLinear", ["oq", "relu_q_scale", "relu_q_zero_point"], ["odq"],
                                         name="out_dq"))
    then = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["odq", "t_scale", "relu_q_zero_point"], ["tq"], name="inner_q"),
         helper.make_node("DequantizeLinear", ["tq", "t_scale", "relu_q_zero_point"], ["t_out"], name="inner_dq")],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(np.array(inner_scale, np.float32), "t_scale")])
    other = helper.make_graph([helper.make_node("Identity", ["odq"], ["e_out"], name="inner_id")], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, shape)])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    m.graph.node.append(helper.make_node("If", ["flag"], ["final"], then_branch=then, else_branch=other,
                                         name="branch"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("final", TensorProto.FLOAT, shape))
    return m


def test_outer_tensors_read_by_a_branch_have_the_if_as_consumer() -> None:
    m = branching()
    node = next(n for n in m.graph.node if n.op_type == "If")
    assert outer_references(node) == {"odq", "relu_q_zero_point"}
    ctx = ModelContext(as_model(m))
    assert [ctx.nodes[i].op_type for i in ctx.consumers["odq"]] == ["If"]


def test_a_dequantize_read_only_by_branches_is_not_dead() -> None:
    findings = tiexport.validate(branching(), "AM68A").findings
    assert not [f for f in findings if f.rule_id == "TIDL031" and "never used" in f.message], findings
    assert not [f for f in findings if f.severity == "error"], findings


def test_fix_keeps_what_the_branches_read(tmp_path: Path) -> None:
    fixed, report = tiexport.fix(branching(), "AM68A", num_samples=2)
    assert_loadable(fixed)
    assert report.parity_passed and report.bit_identical
    names = {n.name for n in fixed.graph.node}
    assert "branch" in names


def test_qdq_parameters_inside_a_branch_are_checked() -> None:
    findings = [f for f in tiexport.validate(branching(-1.0), "AM68A").findings if f.rule_id == "TIDL011"]
    assert {f.node for f in findings} == {"branch/then_branch/inner_q", "branch/then_branch/inner_dq"}
    assert all("scale must be positive and finite" in f.message and f.severity == "error" for f in findings)


def test_subgraph_contexts_see_outer_initializers_and_nesting() -> None:
    outer = branching()
    # nest the whole If inside a Loop body of one trip
    if_node = next(n for n in outer.graph.node if n.op_type == "If")
    shape = [d.dim_value for d in outer.graph.output[0].type.tensor_type.shape.dim]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), if_node],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("final", TensorProto.FLOAT, shape)])
    outer.graph.node.remove(if_node)
    outer.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    outer.graph.node.append(helper.make_node("Loop", ["one", ""], ["stacked"], body=body, name="loop"))
    del outer.graph.output[:]
    outer.graph.output.append(helper.make_tensor_value_info("stacked", TensorProto.FLOAT, [1, *shape]))
    subs = subgraph_contexts(ModelContext(as_model(outer)))
    labels = sorted(n.name for s in subs for n in s.nodes)
    assert "loop/body/branch/then_branch/inner_q" in labels
    inner = next(s for s in subs if any(n.name.endswith("inner_q") for n in s.nodes))
    assert inner.is_const("relu_q_zero_point") and inner.is_const("t_scale")
