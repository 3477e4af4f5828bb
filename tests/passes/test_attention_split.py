"""SplitQkvBeforeHeadsPass: timm's q/k/v unbind from a 5-D [3, B, heads, N, dim] tensor (TIDL058: TIDL's Slice/Split
takes at most 4 dimensions) becomes 3-D Slices of the projection and a Reshape + Transpose per part, exactly.

The graphs are what both exporters write for ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`` with
a shared fake-quant: a Q/DQ pair after the Reshape and after the Transpose; TorchScript splits with one Split,
dynamo with three Slices, each followed by a Squeeze."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.export_helpers import model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.attention_split import SplitQkvBeforeHeadsPass
from tiexport.passes.dead_nodes import RemoveDeadNodesPass
from tiexport.validators.validate import validate

B, N, H, D = 1, 5, 2, 4
C = H * D


def _qdq(nodes: list[onnx.NodeProto], x: str, name: str, scale: str = "s", zp: str = "z") -> str:
    nodes.append(helper.make_node("QuantizeLinear", [x, scale, zp], [f"{name}_q"], name=f"{name}/QuantizeLinear"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", scale, zp], [f"{name}_dq"],
                                  name=f"{name}/DequantizeLinear"))
    return f"{name}_dq"


def _qkv_model(slices: bool = False, perm: tuple[int, ...] = (2, 0, 3, 1, 4), other_scale: bool = False,
               extra_reader: bool = False) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    x = _qdq(nodes, "x", "input")
    nodes.append(helper.make_node("Reshape", [x, "five"], ["r"], name="reshape"))
    r = _qdq(nodes, "r", "after_reshape")
    nodes.append(helper.make_node("Transpose", [r], ["t"], name="permute", perm=list(perm)))
    t = _qdq(nodes, "t", "after_permute", scale="s2" if other_scale else "s")
    if slices:
        parts = []
        for i in range(3):
            nodes.append(helper.make_node("Slice", [t, f"start{i}", f"end{i}", "axis0"], [f"p{i}"], name=f"slice{i}"))
            parts.append(f"p{i}")
    else:
        nodes.append(helper.make_node("Split", [t, "ones"], ["p0", "p1", "p2"], name="split", axis=0))
        parts = ["p0", "p1", "p2"]
    outs = {}
    for i, p in enumerate(parts):
        nodes.append(helper.make_node("Squeeze", [p, "axis0"], [f"sq{i}"], name=f"squeeze{i}"))
        y = _qdq(nodes, f"sq{i}", f"qkv{i}")
        nodes.append(helper.make_node("Relu", [y], [f"y{i}"], name=f"use{i}"))
        outs[f"y{i}"] = [B, H, N, D]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["t"], ["also"], name="also"))
        outs["also"] = [3, B, H, N, D]
    inits = {"five": np.array([B, N, 3, H, D], np.int64), "ones": np.array([1, 1, 1], np.int64),
             "axis0": np.array([0], np.int64), "s": np.array(0.05, np.float32), "s2": np.array(0.1, np.float32),
             "z": np.array(0, np.int8)}
    inits.update({f"start{i}": np.array([i], np.int64) for i in range(3)})
    inits.update({f"end{i}": np.array([i + 1], np.int64) for i in range(3)})
    return model(nodes, {"x": [B, N, 3 * C]}, outs, inits, markers=False)


@pytest.mark.parametrize("slices", [False, True], ids=["torchscript_split", "dynamo_slices"])
def test_qkv_unbind_becomes_a_3d_split_and_heads_exactly(slices: bool) -> None:
    before = _qkv_model(slices)
    x = np.random.default_rng(0).uniform(-4, 4, (B, N, 3 * C)).astype(np.float32)
    out, results = apply(before, SplitQkvBeforeHeadsPass(), RemoveDeadNodesPass(), SplitQkvBeforeHeadsPass())
    assert results[0].changes == 1 and not results[0].numerics_changed and not results[2].modified
    ops = [n.op_type for n in out.graph.node]
    assert "Squeeze" not in ops and "Split" not in ops and ops.count("Slice") == 3 and ops.count("Reshape") == 3
    assert ops.count("Transpose") == 3
    assert_valid(out)
    for a, b in zip(outputs_of(out, {"x": x}), outputs_of(before, {"x": x}), strict=True):
        np.testing.assert_array_equal(a, b)
    findings = [f for f in validate(before, "AM68A").devices["AM68A"].findings if f.rule_id == "TIDL058"]
    assert findings and all(f.hint.startswith("tiexport fix rewrites") and f.fixable for f in findings)
    assert not [f for f in validate(out, "AM68A").devices["AM68A"].findings if f.rule_id == "TIDL058"]


@pytest.mark.parametrize("kwargs", [{"perm": (2, 0, 1, 3, 4)}, {"other_scale": True}, {"extra_reader": True}],
                         ids=["other_permutation", "qdq_params_differ", "5d_tensor_read_elsewhere"])
def test_other_patterns_are_left_alone(kwargs: dict[str, object]) -> None:
    _, results = apply(_qkv_model(**kwargs), SplitQkvBeforeHeadsPass())  # type: ignore[arg-type]
    assert not results[0].modified
