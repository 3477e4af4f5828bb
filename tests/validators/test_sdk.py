"""``sdk=`` / ``--sdk``: each difference between TIDL releases' operator tables (edgeai-tidl-tools
``docs/supported_ops_rts_versions.md`` at rel_09_02, rel_10_00, rel_10_01, rel_11_00) changes the verdict, one test
per difference; reports, fix and snippets name the release they checked against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import tiexport
from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from fixtures.op_fixtures import OP_FIXTURES
from tests.validators.test_rules_ops import _single
from tiexport.cli import main
from tiexport.errors import UsageError
from tiexport.snippets import runtime_options, snippet
from tiexport.tidl_spec import DEFAULT_SDK, SDK_VERSIONS, get_spec
from tiexport.workflows.fix import fix

f32, i64 = np.float32, np.int64


def _flags(model: onnx.ModelProto, sdk: str, device: str = "AM68A", node: str = "op") -> list[str]:
    """Rule ids of the non-info findings at ``node`` (None: the whole report) under ``sdk``."""
    report = tiexport.validate(model, device, sdk=sdk)
    assert report.sdk == sdk
    return sorted(f.rule_id for f in report.devices[device].findings
                  if f.severity != "info" and (node is None or f.node == node))


def _differs(model: onnx.ModelProto, flagged: list[str], clean: list[str], rule: str, device: str = "AM68A",
             node: str | None = "op") -> None:
    for sdk in flagged:
        assert rule in _flags(model, sdk, device, node), sdk
    for sdk in clean:
        assert rule not in _flags(model, sdk, device, node), sdk


def test_versions_and_default() -> None:
    assert SDK_VERSIONS == ("9.2", "10.0", "10.1", "11.0") and DEFAULT_SDK == "11.0"
    assert get_spec("11.00").sdk == "11.0" and get_spec("10_01").sdk == "10.1"
    with pytest.raises(UsageError, match="unknown TIDL SDK"):
        get_spec("12.0")


def test_every_op_row_cites_its_release_branch() -> None:
    for sdk in SDK_VERSIONS:
        spec = get_spec(sdk)
        for op in spec.op_lines:
            assert spec.op_source(op).startswith(f"TexasInstruments/edgeai-tidl-tools@{spec.branch}:docs/"), op


# ------------------------------------------------------------------------------------------------ operator rows
def test_hardswish_has_a_row_from_10_1() -> None:
    _differs(_single("HardSwish", [1, 4, 4, 4]), ["9.2", "10.0"], ["10.1", "11.0"], "TIDL040")


def test_topk_has_a_row_from_10_1() -> None:
    model = _single("TopK", [1, 4, 4, 4], np.array([2], i64), axis=-2, n_out=2)
    _differs(model, ["10.0"], ["10.1", "11.0"], "TIDL040")


def test_sub_has_a_row_from_10_0() -> None:
    _differs(_single("Sub", [1, 4, 4, 4], np.ones((1, 4, 1, 1), f32)), ["9.2"], ["10.0", "10.1", "11.0"], "TIDL040")


def test_spacetodepth_has_a_row_from_11_0() -> None:
    _differs(_single("SpaceToDepth", [1, 4, 4, 4], blocksize=2), ["10.1"], ["11.0"], "TIDL040")


def test_resize_is_read_from_9_2s_upsample_row() -> None:
    model = _single("Resize", [1, 4, 4, 4], "", np.array([1, 1, 2, 2], f32), mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    for sdk in SDK_VERSIONS:
        assert _flags(model, sdk) == [], sdk


# ------------------------------------------------------------------------------------------------ constraints
def test_softmax_along_height_from_11_0() -> None:
    _differs(_single("Softmax", [1, 4, 4, 4], axis=2), ["10.1"], ["11.0"], "TIDL054")


def test_convtranspose_3x3_until_10_1() -> None:
    model = _single("ConvTranspose", [1, 4, 4, 4], "weight:4x4x3x3", kernel_shape=[3, 3], strides=[2, 2])
    _differs(model, ["9.2", "11.0"], ["10.0", "10.1"], "TIDL062")


def test_convtranspose_8x8_only_in_9_2() -> None:
    model = _single("ConvTranspose", [1, 4, 4, 4], "weight:4x4x8x8", kernel_shape=[8, 8], strides=[2, 2],
                    pads=[3, 3, 3, 3])
    _differs(model, ["10.0", "11.0"], ["9.2"], "TIDL062")


def test_depthwise_5x5_stride_2_from_10_0() -> None:
    model = tiny_conv(group=3, out_channels=3, kernel=5, stride=2)
    _differs(model, ["9.2"], ["10.0", "11.0"], "TIDL050", node=None)


def test_3x3_stride_3_conv_on_am67a_from_11_0() -> None:
    model = OP_FIXTURES["TIDL050_conv_3x3_stride_3"]()
    _differs(model, ["11.0"], ["10.1"], "TIDL050", device="AM67A", node=None)
    _differs(model, ["10.0", "11.0"], ["9.2"], "TIDL050", device="AM62A", node=None)


def test_depth_to_space_on_am62a_from_11_0() -> None:
    model = _single("DepthToSpace", [1, 8, 4, 4], blocksize=2)
    _differs(model, ["9.2", "10.1"], ["11.0"], "TIDL071", device="AM62A")
    assert _flags(model, "10.1", "AM68A") == []


def test_layernorm_over_more_than_the_last_axis_from_11_0() -> None:
    model = OP_FIXTURES["TIDL066_layernorm_axis"]()
    _differs(model, ["11.0"], ["10.0", "10.1"], "TIDL066", node=None)


def test_div_of_two_variables_from_11_0() -> None:
    b = QdqBuilder(seed=0)
    x = b.qdq(b.input("input", [1, 4, 4, 4]), 2.0**-6, 0, "int8", name="input")
    y = b.qdq(b.input("other", [1, 4, 4, 4]), 2.0**-6, 0, "int8", name="other")
    b.output(b.qdq(b.node("Div", [x, y], name="op"), 2.0**-4, 0, "int8", name="div"))
    _differs(b.build(), ["10.0", "10.1"], ["11.0"], "TIDL064")


def test_gridsample_bilinear_from_11_0() -> None:
    model = _single("GridSample", [1, 4, 4, 4], ("grid", [1, 4, 4, 2], TensorProto.FLOAT), mode="bilinear")
    _differs(model, ["10.0", "10.1"], ["11.0"], "TIDL073")


def test_clip_range_rule_from_10_1() -> None:
    model = _single("Clip", [1, 4, 4, 4], np.array(0.5, f32), np.array(1.0, f32))
    _differs(model, ["10.1", "11.0"], ["10.0"], "TIDL060")


def test_argmax_select_last_index_from_11_0() -> None:
    model = _single("ArgMax", [1, 4, 4, 4], axis=1, keepdims=1, select_last_index=1)
    _differs(model, ["11.0"], ["10.1"], "TIDL059")


def test_pooling_dilation_from_11_0() -> None:
    model = _single("MaxPool", [1, 4, 8, 8], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2])
    _differs(model, ["11.0"], ["10.1"], "TIDL051")


def test_gather_with_scalar_index_in_9_2_and_11_0() -> None:
    model = OP_FIXTURES["TIDL068_gather_scalar_index"]()
    _differs(model, ["9.2", "11.0"], ["10.0", "10.1"], "TIDL068", node=None)


def test_gather_from_a_constant_table_from_10_1() -> None:
    b = QdqBuilder(seed=0)
    idx = b.input("idx", [2], TensorProto.INT64)
    table = b.const(np.arange(24, dtype=f32).reshape(6, 4), "table")
    b.output(b.qdq(b.node("Gather", [table, idx], axis=0, name="op"), 2.0**-2, 0, "int8", name="out"))
    _differs(b.build(), ["10.1", "11.0"], ["10.0"], "TIDL068")


def test_matmul_mixed_signs_on_tda4vm_from_10_1() -> None:
    b = QdqBuilder(seed=0)
    x = b.qdq(b.input("a", [1, 4, 8]), 2.0**-6, 0, "int8", name="a")
    y = b.qdq(b.input("b", [1, 8, 4]), 2.0**-6, 0, "uint8", name="b")
    b.output(b.qdq(b.node("MatMul", [x, y], name="op"), 2.0**-4, 0, "int8", name="mm"))
    _differs(b.build(), ["10.1", "11.0"], ["10.0"], "TIDL024", device="TDA4VM")


def test_opset_19_from_10_1() -> None:
    model = tiny_conv(opset=19)
    _differs(model, ["9.2", "10.0"], ["10.1", "11.0"], "TIDL003", node=None)
    assert tiexport.validate(model, "AM68A", sdk="10.0").devices["AM68A"].verdict == "incompatible"
    assert tiexport.validate(model, "AM68A", sdk="10.1").devices["AM68A"].verdict == "compatible"


def test_node_limit_documented_from_11_0() -> None:
    from fixtures.op_fixtures import relu_chain

    model = relu_chain(288)  # 866 nodes in one subgraph, over 11.0's default 864
    findings = {sdk: [f.rule_id for f in tiexport.validate(model, "AM68A", sdk=sdk).findings]
                for sdk in ("10.1", "11.0")}
    assert findings == {"10.1": [], "11.0": ["TIDL041"]}


# ------------------------------------------------------------------------------------------------ plumbing
def test_report_json_and_text_name_the_sdk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv(opset=19), str(path))
    assert main(["validate", str(path), "-d", "AM68A", "--sdk", "10.0", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["tidl_sdk"] == "10.0"
    assert [f["rule_id"] for f in doc["devices"]["AM68A"]["findings"]] == ["TIDL003"]
    assert doc["devices"]["AM68A"]["findings"][0]["source"].startswith(
        "TexasInstruments/edgeai-tidl-tools@rel_10_00:docs/supported_ops_rts_versions.md#L")
    assert main(["validate", str(path), "-d", "AM68A", "--sdk", "10.1"]) == 0
    assert "AM68A (TIDL 10.1): compatible" in capsys.readouterr().out


def test_cli_rejects_an_unknown_sdk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(path))
    assert main(["validate", str(path), "--sdk", "8.6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8.6" in err


def test_fix_and_snippet_take_the_sdk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = OP_FIXTURES["TIDL040_identity"]()
    _, report = fix(model, "AM68A", sdk="10.1", parity=False)
    assert report.sdk == "10.1" and report.to_dict()["tidl_sdk"] == "10.1"
    assert "(TIDL 10.1)" in report.to_text()
    text = snippet(tiny_conv(), "AM68A", "tidl", sdk="10.0")
    assert "checked against TIDL SDK 10.0" in text
    # the MMAv2 preset (4): what edgeai-benchmark 9.2's YAML loader compiles with (issue 17: formats agree)
    assert runtime_options(tiny_conv(), "AM68A", sdk="9.2")["advanced_options:quantization_scale_type"] == 4
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv(opset=19), str(path))
    # an opset TIDL 10.0 cannot read: refused for 10.0, generated for 10.1
    assert main(["snippet", str(path), "-d", "AM68A", "--format", "tidl-json", "--sdk", "10.0"]) == 1
    assert "TIDL003" in capsys.readouterr().err
    assert main(["snippet", str(path), "-d", "AM68A", "--format", "tidl-json", "--sdk", "10.1"]) == 0
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(path), "-o", str(out), "-d", "AM68A", "--sdk", "10.1", "--no-parity"]) == 0
    assert "(TIDL 10.1)" in capsys.readouterr().out
