"""One test per robustness bug found by the catalogue and the fuzzing (issue 9), each on the smallest model that
showed it. The catalogue tests cover the rest (cycle, duplicate producers, non-UTF-8 names, ORT log lines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tiexport
from fixtures.builders import QdqBuilder
from fixtures.malformed import case_by_name
from fixtures.models import tiny_conv
from tests.robustness.helpers import assert_loadable, cli
from tiexport.errors import UnusableInputError

ROOT = Path(__file__).resolve().parents[2]


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_attr(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
    for a in list(node.attribute):
        if a.name == attr.name:
            node.attribute.remove(a)
    node.attribute.append(attr)


def _crashed(model: onnx.ModelProto, device: str = "all") -> list[str]:
    return [f.message for f in tiexport.validate(model, device).findings if f.rule_id == "TIDL000"]


# ------------------------------------------------------------------------------------------------ validate
def test_op_rules_skip_a_node_whose_attribute_has_the_wrong_type() -> None:
    # ops.py read `[int(s) for s in strides]` from a FLOAT attribute: TypeError in every TIDL040/05x-07x rule
    m = tiny_conv()
    _set_attr(_node(m, "conv"), helper.make_attribute("strides", 1.0))
    assert _crashed(m) == []
    assert any(f.rule_id == "TIDL001" for f in tiexport.validate(m, "AM68A").findings)


def test_layernorm_rule_takes_a_scalar_input() -> None:
    # LayerNormRule indexed shape[-1] of a 0-d input: IndexError
    b = QdqBuilder(opset=17, name="scalar_layernorm")
    x = b.input("x", [])
    y = b.node("LayerNormalization", [x, b.const(np.float32(1.0), "g")], name="ln")
    b.output(y, shape=[])
    assert _crashed(b.build()) == []


def test_matmul_sign_rule_takes_a_matmul_with_one_input() -> None:
    # MatMulSignRule read node.input[1] unconditionally: IndexError
    b = QdqBuilder(opset=17, name="one_input_matmul")
    a = b.qdq(b.input("a", [1, 8, 16]), 2.0**-6, 0, "int8", name="a")
    b.output(b.node("MatMul", [a], name="matmul"))
    assert _crashed(b.build()) == []


def test_bias_rule_takes_a_uint2_bias_behind_an_int32_zero_point() -> None:
    # BiasRule compared the decoded bias (ml_dtypes uint2) with +-32768 (TDA4VM's 16-bit limit): OverflowError
    m = tiny_conv()
    for t in m.graph.initializer:
        if t.name == "conv_bias_quantized":
            t.data_type = TensorProto.UINT2  # 16 raw bytes of int32 data read as 2-bit values
    assert _crashed(m, "TDA4VM") == []


def test_negative_input_dim_does_not_abort_shape_inference() -> None:
    # onnx's C++ Slice inference asserted (SIGABRT, the whole interpreter gone) on an input dim of -1
    b = QdqBuilder(opset=17, name="negative_dim_slice")
    x = b.qdq(b.input("input", [1, 4, 8, -1]), 2.0**-8, 0, "uint8", name="input")
    starts, ends, axes = (b.const(np.array([v], np.int64), n) for v, n in ((0, "s"), (2, "e"), (3, "a")))
    b.output(b.qdq(b.node("Slice", [x, starts, ends, axes], name="slice"), 2.0**-8, 0, "uint8", name="slice"))
    model = b.build(infer=False)
    code = ("import sys, onnx, tiexport\n"
            "m = onnx.load_model_from_string(sys.stdin.buffer.read())\n"
            "r = tiexport.validate(m, 'AM68A')\n"
            "print(sorted({f.rule_id for f in r.findings}))\n")
    res = subprocess.run([sys.executable, "-c", code], input=model.SerializeToString(), capture_output=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert "TIDL004" in res.stdout.decode()


def test_infer_shapes_leaves_the_callers_negative_dims_alone() -> None:
    from tiexport.shapes import infer_shapes

    m = tiny_conv(bias="none")
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = -1
    before = m.SerializeToString()
    inferred = infer_shapes(m)
    assert m.SerializeToString() == before
    assert not inferred.graph.input[0].type.tensor_type.shape.dim[3].HasField("dim_value")


# ------------------------------------------------------------------------------------------------ fix
def test_fix_refuses_two_producers_instead_of_rewiring_the_weight() -> None:
    # gs kept the Identity's output as the Conv weight: fix wrote Conv(x, x) and validate found nothing wrong
    model = case_by_name("duplicate_tensor_name").model()  # type: ignore[misc]
    with pytest.raises(UnusableInputError, match="has two producers"):
        tiexport.fix(model, "AM68A", parity=False)


def test_fix_refuses_a_cycle_with_one_line() -> None:
    # gs.toposort raised OnnxGraphSurgeonException: "internal error" from the CLI
    with pytest.raises(UnusableInputError, match="the graph has a cycle"):
        tiexport.fix(case_by_name("cycle").model(), "AM68A", parity=False)  # type: ignore[misc]


def test_fix_blames_the_input_when_a_pass_trips_over_a_checker_failure() -> None:
    # NormalizeQdqParamsPass did int('nearest') on a STRING axis: "pass ... failed (ValueError ...)"
    m = tiny_conv()
    _set_attr(_node(m, "relu_q_QuantizeLinear"), helper.make_attribute("axis", "nearest"))
    with pytest.raises(UnusableInputError, match=r"the input model already fails onnx\.checker"):
        tiexport.fix(m, "AM68A", parity=False)


def test_fix_cli_stdout_is_only_the_json_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # onnx-graphsurgeon printed "[W] Could not convert: FLOAT8E4M3FNUZ ..." to stdout ahead of the JSON
    from onnx_graphsurgeon.logger import G_LOGGER

    monkeypatch.setattr(G_LOGGER, "severity", G_LOGGER.INFO)  # as in a fresh process
    m = tiny_conv()
    m.graph.initializer.append(helper.make_tensor("unused_fp8", TensorProto.FLOAT8E4M3FNUZ, [4],
                                                  vals=b"\x01\x02\x03\x04", raw=True))
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    rc, out, err = cli("fix", str(path), "-o", str(tmp_path / "o.onnx"), "-d", "AM68A", "--format", "json",
                       "--no-parity")
    assert rc == 0, err
    assert json.loads(out)["device"] == "AM68A"


def test_fix_leaves_a_per_channel_scale_that_does_not_match_its_axis_to_the_validator() -> None:
    # ConvertPerChannelToPerTensorPass dequantized 4 scales along axis -1 (size 3): "operands could not be broadcast"
    m = tiny_conv(w_per_channel=True, bias="none")
    _set_attr(_node(m, "conv_weight_DequantizeLinear"), helper.make_attribute("axis", -1))
    fixed, report = tiexport.fix(m, "TDA4VM", parity=False)
    assert_loadable(fixed)
    assert any(f.rule_id == "TIDL011" and "4 scales for axis -1 of size 3" in f.message for f in report.errors)


def _huge_input_model(scale: float = 2.0**-8) -> onnx.ModelProto:
    b = QdqBuilder(opset=17, name="huge_input")
    x = b.qdq(b.input("input", [2**31, 8, 16]), scale, 0, "uint8", name="input")
    b.output(b.qdq(b.relu(x), scale, 0, "uint8", name="relu"))
    return b.build()


def test_fix_skips_parity_for_an_input_too_large_to_draw() -> None:
    # _random_inputs asked numpy for 2 TiB: MemoryError, a traceback through the API. A scale TDA4VM rounds to a
    # power of two makes fix change numerics, so parity has to run (an unchanged graph needs no samples).
    _, report = tiexport.fix(_huge_input_model(0.003), "TDA4VM", num_samples=1)
    assert report.numerics_changed
    assert report.parity is not None and "too large for random data" in report.parity["skipped"]


def test_parity_refuses_an_input_too_large_to_draw() -> None:
    from tiexport.errors import UsageError

    model = _huge_input_model()
    with pytest.raises(UsageError, match="too large for random data"):
        tiexport.check_parity(model, model, num_samples=1)


def test_fix_refuses_a_model_whose_declared_shapes_contradict_shape_inference() -> None:
    # an input dim of -1 next to stale value_info: fix returned a model ONNX Runtime loads but the full checker
    # (strict shape inference, what TIDL runs) rejects
    m = tiny_conv()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -1
    with pytest.raises(UnusableInputError, match=r"already fails onnx\.checker"):
        tiexport.fix(m, "AM68A", num_samples=1)


def test_bias_rule_takes_a_scalar_float_bias() -> None:
    # the float-bias clipping check broadcast a [1] scale onto a 0-d bias: "cannot broadcast a non-scalar to a scalar"
    m = tiny_conv(bias="float")
    for t in m.graph.initializer:
        if t.name == "conv_bias":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array(0.25, np.float32), t.name))
    assert _crashed(m) == []


def test_op_rules_take_a_string_attribute_that_is_not_utf8() -> None:
    # ResizeRule decoded mode=b"\xad\xff" strictly: UnicodeDecodeError in every op rule
    b = QdqBuilder(opset=17, name="resize_bad_mode")
    x = b.qdq(b.input("input", [1, 3, 8, 8]), 2.0**-8, 0, "uint8", name="input")
    scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
    y = b.node("Resize", [x, "", scales], name="resize", mode=b"\xad\xff")
    b.output(b.qdq(y, 2.0**-8, 0, "uint8", name="resize"))
    assert _crashed(b.build(infer=False)) == []


def _graph_name_not_utf8() -> bytes:
    data = tiny_conv().SerializeToString()
    assert data.count(b"tiny_conv") == 1  # the graph name
    return data.replace(b"tiny_conv", b"tiny\xffconv")


def test_snippet_of_a_model_whose_graph_name_is_not_utf8() -> None:
    # _stem ran re.sub over the bytes protobuf returns for it: TypeError
    text = tiexport.snippet(_graph_name_not_utf8(), "AM68A", "benchmark")
    compile(text, "snippet", "exec")


def test_parity_of_a_model_proto_whose_graph_name_is_not_utf8() -> None:
    # the loaded model's name (graph.name, bytes) went into Path(): TypeError
    model = onnx.load_model_from_string(_graph_name_not_utf8())
    assert tiexport.check_parity(model, model, num_samples=1).passed


def test_validate_reports_an_initializer_whose_data_is_short_for_its_shape() -> None:
    # the checker runs on the weight-free skeleton, so a [2**31] int64 tensor holding 16 bytes passed validate (and
    # its skeleton input made onnx's data propagation allocate 24 GB)
    m = tiny_conv()
    steps = onnx.TensorProto(name="huge_steps", data_type=TensorProto.INT64, dims=[2**31])
    steps.raw_data = bytes(16)
    m.graph.initializer.append(steps)
    findings = tiexport.validate(m, "AM68A").findings
    assert any(f.rule_id == "TIDL001" and "'huge_steps' holds 16 bytes" in f.message for f in findings)


def test_shape_inference_treats_a_huge_integer_input_as_unknown() -> None:
    # data propagation allocated a value per declared element of a Slice `steps` input: 24 GB, or the OOM killer
    b = QdqBuilder(opset=17, name="huge_steps")
    x = b.input("x", [1, 4, 8, 8])
    starts, ends, axes = (b.const(np.array(v, np.int64), n) for v, n in (([0], "s"), ([8], "e"), ([3], "a")))
    steps = b.input("steps", [2**31], TensorProto.INT64)
    b.output(b.node("Slice", [x, starts, ends, axes, steps], name="slice"))
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # a regression fails fast, not the box\n"
            "import onnx\n"
            "from tiexport.shapes import infer_shapes\n"
            "infer_shapes(onnx.load_model_from_string(sys.stdin.buffer.read()))\n")
    res = subprocess.run([sys.executable, "-c", code], input=b.build(infer=False).SerializeToString(),
                         capture_output=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]


def test_messages_stay_on_one_line_when_the_graph_name_has_a_newline(tmp_path: Path) -> None:
    # fix's error named the ModelProto by its graph name, which held "\n": a multi-line error
    m = case_by_name("cycle").model()  # type: ignore[misc]
    m.graph.name = "two\nlines"
    with pytest.raises(UnusableInputError) as info:
        tiexport.fix(m, "AM68A", parity=False)
    assert "\n" not in str(info.value)


def test_op_rules_check_attribute_types_of_an_op_newer_than_the_opset() -> None:
    # DeformConv under opset 10 has no schema at that version, so the type check let an INT kernel_shape through
    b = QdqBuilder(opset=10, name="deform_conv_opset10")
    x = b.qdq(b.input("input", [1, 4, 8, 8]), 2.0**-8, 0, "uint8", name="input")
    w = b.weight(shape=(4, 4, 3, 3), per_channel=False, p2=True, name="deform_weight")
    offset = b.const(np.zeros((1, 18, 8, 8), np.float32), "offset")
    b.output(b.node("DeformConv", [x, w, offset], name="deform_conv", kernel_shape=3))
    assert _crashed(b.build(infer=False)) == []
