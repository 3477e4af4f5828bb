"""check_parity between ONNX models (real ONNX Runtime sessions), the metrics on hand-computed arrays, input handling."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from fixtures.builders import QdqBuilder
from fixtures.models import tiny_conv
from tiexport.context import ModelContext
from tiexport.errors import UnusableInputError, UsageError
from tiexport.onnx_io import as_model
from tiexport.parity import (
    OnnxRunner,
    ParityReport,
    check_parity,
    load_inputs,
    quant_step,
    tensor_metrics,
)

ACT = 2.0**-4


def three_layer(batch: int | str = 1, seed: int = 3) -> onnx.ModelProto:
    """input -> Q/DQ -> 3 x (Conv -> Relu -> Q/DQ 'layer{i}') -> output; per-tensor int8 weights."""
    b = QdqBuilder(seed=seed, name="three_layer")
    x = b.input("input", [batch, 3, 8, 8])
    x = b.qdq(x, 2.0**-8, 0, "uint8", name="input")
    for i, (c_in, c_out) in enumerate([(3, 8), (8, 8), (8, 4)]):
        w = b.weight(shape=(c_out, c_in, 3, 3))
        y = b.conv(x, w, pads=[1, 1, 1, 1], name=f"conv{i}")
        x = b.qdq(b.relu(y), ACT, 0, "uint8", name=f"layer{i}")
    b.output(x)
    return b.build()


def corrupt_scale(model: onnx.ModelProto, names: tuple[str, ...], factor: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in names:
            init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * factor).astype(np.float32), init.name))
    return out


MIDDLE = ("layer1_q_scale", "layer1_dq_scale")


# ------------------------------------------------------------------------------------------------ whole models
def test_identical_models_pass_with_zero_error() -> None:
    model = three_layer()
    report = check_parity(model, model, per_layer=True)
    assert report.passed
    assert report.first_divergence is None
    (m,) = report.outputs.values()
    assert m.max_abs == 0.0 and m.max_lsb == 0.0 and m.within_1_lsb == 1.0
    assert m.sqnr_db == math.inf and m.cosine == 1.0 and m.min_atol_to_pass == 0.0
    assert len(report.layers) >= 9
    assert all(layer.metrics.max_abs == 0.0 and layer.metrics.passed for layer in report.layers)


def test_corrupted_middle_scale_fails_and_names_that_layer_first() -> None:
    ref = three_layer()
    cand = corrupt_scale(ref, MIDDLE, 1.7)
    report = check_parity(ref, cand, per_layer=True)
    assert not report.passed
    fd = report.first_divergence
    assert fd is not None
    assert fd["node"] == "layer1_dq_DequantizeLinear"
    assert fd["op_type"] == "DequantizeLinear"
    assert fd["tensor"] == "layer1_dq_DequantizeLinear_out"
    assert not fd["metrics"].passed
    index = [layer.tensor for layer in report.layers].index(fd["tensor"])
    assert all(layer.metrics.max_abs == 0.0 for layer in report.layers[:index])


def test_middle_layer_error_is_measured_in_the_reference_step() -> None:
    ref = three_layer()
    report = check_parity(ref, corrupt_scale(ref, MIDDLE, 1.7), per_layer=True)
    layer = next(x for x in report.layers if x.tensor == "layer1_dq_DequantizeLinear_out")
    assert layer.metrics.step == ACT
    assert layer.metrics.max_lsb == pytest.approx(layer.metrics.max_abs / ACT)


def test_without_per_layer_first_divergence_is_the_failing_output() -> None:
    ref = three_layer()
    report = check_parity(ref, corrupt_scale(ref, MIDDLE, 1.7))
    assert not report.passed and report.layers == []
    assert report.first_divergence is not None
    assert report.first_divergence["tensor"] == ref.graph.output[0].name
    assert report.first_divergence["node"] == "layer2_dq_DequantizeLinear"


def test_min_lsb_to_pass_is_the_tolerance_that_passes() -> None:
    ref = three_layer()
    cand = corrupt_scale(ref, MIDDLE, 1.7)
    failed = check_parity(ref, cand)
    (m,) = failed.outputs.values()
    assert not m.passed and m.min_lsb_to_pass is not None and m.min_lsb_to_pass > 1.0
    assert check_parity(ref, cand, max_lsb=m.min_lsb_to_pass).passed
    assert not check_parity(ref, cand, max_lsb=m.min_lsb_to_pass * 0.99).passed


def test_min_atol_to_pass_is_the_tolerance_that_passes() -> None:
    ref = three_layer()
    cand = corrupt_scale(ref, MIDDLE, 1.7)
    (m,) = check_parity(ref, cand, atol=1e-6).outputs.values()
    assert m.criterion == "allclose" and not m.passed
    assert check_parity(ref, cand, atol=m.min_atol_to_pass).passed
    assert not check_parity(ref, cand, atol=m.min_atol_to_pass * 0.99).passed


def test_per_layer_leaves_the_models_unchanged() -> None:
    ref = three_layer()
    before = ref.SerializeToString()
    check_parity(ref, ref, per_layer=True)
    assert ref.SerializeToString() == before


def test_float_output_uses_allclose_defaults() -> None:
    b = QdqBuilder(name="float_out")
    x = b.input("input", [1, 4])
    b.output(b.node("Relu", [x]))
    model = b.build()
    (m,) = check_parity(model, model).outputs.values()
    assert m.criterion == "allclose" and m.max_lsb is None and m.within_1_lsb is None and m.passed


def test_ort_runs_with_graph_optimizations_disabled_by_default() -> None:
    loaded = as_model(three_layer())
    off = OnnxRunner(loaded).session.get_session_options().graph_optimization_level
    on = OnnxRunner(loaded, optimizations=True).session.get_session_options().graph_optimization_level
    assert off == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert on == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_ort_optimizations_flag_still_passes_identical_models() -> None:
    model = three_layer()
    report = check_parity(model, model, ort_optimizations=True)
    assert report.passed and report.ort_optimizations


def test_external_data_candidate_per_layer(tmp_path) -> None:
    model = three_layer()
    onnx.save_model(three_layer(), tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    report = check_parity(model, tmp_path / "ext.onnx", per_layer=True)
    assert report.passed and report.layers


def test_output_shape_mismatch_is_unusable() -> None:
    with pytest.raises(UnusableInputError, match="shape"):
        check_parity(three_layer(), tiny_conv(out_channels=4, size=8, channels=3, stride=2))


def test_outputs_with_other_names_pair_by_position() -> None:
    ref = three_layer()
    cand = onnx.ModelProto()
    cand.CopyFrom(ref)
    old = cand.graph.output[0].name
    for node in cand.graph.node:
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = "renamed"
    cand.graph.output[0].name = "renamed"
    report = check_parity(ref, cand)
    assert list(report.outputs) == ["renamed"] and report.passed


def test_progress_callback_reports_each_sample() -> None:
    calls: list[tuple[int, int]] = []
    model = three_layer()
    check_parity(model, model, num_samples=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_report_json_is_strict_json_with_the_issue_schema() -> None:
    ref = three_layer()
    report = check_parity(ref, corrupt_scale(ref, MIDDLE, 1.7), per_layer=True)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(report.to_json(), parse_constant=no_constants)
    assert {"passed", "outputs", "first_divergence", "layers"} <= set(data)
    assert data["passed"] is False
    assert set(data["first_divergence"]) >= {"tensor", "node", "op_type", "metrics"}
    metrics = data["first_divergence"]["metrics"]
    for key in ("max_abs", "mean_abs", "max_rel", "max_lsb", "within_1_lsb", "sqnr_db", "cosine", "min_atol_to_pass",
                "passed"):
        assert key in metrics
    assert [layer["tensor"] for layer in data["layers"]] == [layer.tensor for layer in report.layers]


def test_identical_report_serializes_infinite_sqnr_as_string() -> None:
    model = three_layer()
    data = check_parity(model, model).to_dict()
    (m,) = data["outputs"].values()
    assert m["sqnr_db"] == "inf"


def test_text_report_names_first_divergence_and_verdict() -> None:
    ref = three_layer()
    report = check_parity(ref, corrupt_scale(ref, MIDDLE, 1.7), per_layer=True)
    text = report.to_text()
    assert "first divergence: layer1_dq_DequantizeLinear_out" in text
    assert "verdict: FAILED" in text
    assert "\033[" not in text
    assert isinstance(report, ParityReport)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_sqnr_and_cosine_by_hand() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    cand = np.array([1.1, 1.9, 3.0, 4.2], dtype=np.float32)
    m = tensor_metrics(ref, cand)
    # signal 1+4+9+16 = 30; noise 0.01+0.01+0+0.04 = 0.06
    assert m.sqnr_db == pytest.approx(10 * math.log10(30 / 0.06), rel=1e-5)
    # dot 1.1+3.8+9+16.8 = 30.7; |cand|^2 1.21+3.61+9+17.64 = 31.46
    assert m.cosine == pytest.approx(30.7 / math.sqrt(30 * 31.46), rel=1e-6)
    assert m.max_abs == pytest.approx(0.2, rel=1e-5)
    assert m.mean_abs == pytest.approx(0.4 / 4, rel=1e-5)
    assert m.max_rel == pytest.approx(0.1, rel=1e-5)  # 0.1 / 1 at the first element
    assert m.max_lsb is None and m.within_1_lsb is None
    assert not m.passed and m.criterion == "allclose"


def test_metrics_in_lsb_units_by_hand() -> None:
    ref = np.array([0.0, 0.5, 1.0, 1.5], dtype=np.float32)
    cand = np.array([0.0, 1.0, 1.0, 0.5], dtype=np.float32)
    m = tensor_metrics(ref, cand, step=0.5)
    assert m.max_lsb == pytest.approx(2.0)  # errors 0, 1, 0, 2 steps
    assert m.within_1_lsb == pytest.approx(3 / 4)
    assert m.min_lsb_to_pass == pytest.approx(2.0)  # 4 elements: 99.9 % means all of them
    assert not m.passed and m.criterion == "lsb" and m.step == 0.5
    assert tensor_metrics(ref, cand, step=0.5, max_lsb=2.0).passed


def test_lsb_criterion_allows_one_in_a_thousand() -> None:
    ref = np.zeros(1000, dtype=np.float32)
    one_off = ref.copy()
    one_off[7] = 3.0
    two_off = one_off.copy()
    two_off[500] = 3.0
    m1 = tensor_metrics(ref, one_off, step=1.0)
    m2 = tensor_metrics(ref, two_off, step=1.0)
    assert m1.passed and m1.within_1_lsb == pytest.approx(0.999) and m1.max_lsb == 3.0 and m1.min_lsb_to_pass == 0.0
    assert not m2.passed and m2.min_lsb_to_pass == 3.0


def test_lsb_criterion_absorbs_float32_rounding_of_grid_values() -> None:
    step = np.float32(0.0123)
    q = np.arange(0, 256, dtype=np.float32)
    ref = q * step
    cand = (q + 1) * step  # exactly one grid step away, after float32 rounding
    m = tensor_metrics(ref, cand, step=float(step))
    assert m.within_1_lsb == 1.0 and m.passed


def test_metrics_per_channel_step() -> None:
    ref = np.zeros((1, 2, 2), dtype=np.float32)
    cand = np.array([[[1.0, 1.0], [0.1, 0.2]]], dtype=np.float32)
    m = tensor_metrics(ref, cand, step=[1.0, 0.1], axis=1)
    assert m.max_lsb == pytest.approx(2.0)
    assert m.within_1_lsb == pytest.approx(3 / 4)
    assert m.per_channel and m.step is None


def test_metrics_integer_codes_do_not_wrap() -> None:
    ref = np.array([0, 255], dtype=np.uint8)
    cand = np.array([255, 254], dtype=np.uint8)
    m = tensor_metrics(ref, cand, step=1)
    assert m.max_lsb == 255.0 and m.max_abs == 255.0


def test_metrics_min_atol_uses_the_given_rtol() -> None:
    ref = np.array([10.0, 1.0], dtype=np.float32)
    cand = np.array([11.0, 1.5], dtype=np.float32)
    m = tensor_metrics(ref, cand, atol=0.0, rtol=0.1)
    # |d| - 0.1 |ref| = 1 - 1 = 0 and 0.5 - 0.1 = 0.4
    assert m.min_atol_to_pass == pytest.approx(0.4, rel=1e-5)
    assert not m.passed
    assert tensor_metrics(ref, cand, atol=0.4, rtol=0.1).passed


def test_metrics_zero_reference_and_nan() -> None:
    m = tensor_metrics(np.zeros(3, np.float32), np.array([0.0, 1.0, 0.0], np.float32))
    assert m.sqnr_db == -math.inf and m.cosine == 0.0 and m.max_rel == 0.0
    nan = tensor_metrics(np.ones(2, np.float32), np.array([1.0, np.nan], np.float32))
    assert nan.max_abs == math.inf and not nan.passed


def test_metrics_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        tensor_metrics(np.zeros(2), np.zeros(3))
    with pytest.raises(UsageError):
        tensor_metrics(np.zeros(2), np.zeros(2), max_lsb=0)
    with pytest.raises(UsageError):
        tensor_metrics(np.zeros(2), np.zeros(2), atol=-1)


# ------------------------------------------------------------------------------------------------ quant_step
def test_quant_step_of_dq_output_q_input_and_q_codes() -> None:
    model = three_layer()
    assert quant_step(model, "layer1_dq_DequantizeLinear_out") == ACT
    assert quant_step(model, "relu_1_out") == ACT  # read by layer1's QuantizeLinear
    assert quant_step(model, "layer1_q_QuantizeLinear_out") == 1.0
    assert quant_step(model, "conv1_out") is None


def test_quant_step_through_layout_op_and_identity_scale() -> None:
    b = QdqBuilder(name="layout")
    x = b.input("input", [1, 4])
    s = b.const(np.float32(0.25), "s")
    s_id = b.node("Identity", [s], name="scale_identity")
    z = b.const(np.uint8(0), "z")
    q = b.node("QuantizeLinear", [x, s_id, z], name="q")
    dq = b.node("DequantizeLinear", [q, s_id, z], name="dq")
    shape = b.const(np.array([2, 2], dtype=np.int64), "shape")
    y = b.node("Reshape", [dq, shape], name="reshape")
    b.output(y)
    model = b.build()
    assert quant_step(model, dq) == 0.25
    assert quant_step(model, y) == 0.25


# ------------------------------------------------------------------------------------------------ inputs
def specs_ctx(model: onnx.ModelProto):
    from tiexport.parity import input_specs as _input_specs

    ctx = ModelContext(as_model(model))
    return _input_specs(ctx), ctx


def test_random_inputs_are_seeded_and_cover_the_input_quantization_range() -> None:
    specs, ctx = specs_ctx(three_layer())
    a = load_inputs(None, specs, ctx, num_samples=3, seed=5)
    b = load_inputs(None, specs, ctx, num_samples=3, seed=5)
    c = load_inputs(None, specs, ctx, num_samples=3, seed=6)
    assert len(a) == 3 and all(np.array_equal(x["input"], y["input"]) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0]["input"], c[0]["input"])
    x = a[0]["input"]
    assert x.dtype == np.float32 and x.shape == (1, 3, 8, 8)
    assert x.min() >= 0.0 and x.max() < 1.0  # uint8 scale 2^-8: [0, 1)


def test_random_inputs_refuse_dynamic_dims_with_a_hint() -> None:
    with pytest.raises(UsageError, match="--inputs"):
        check_parity(three_layer(batch="N"), three_layer(batch="N"))


def test_npz_with_leading_sample_axis(tmp_path) -> None:
    data = np.random.default_rng(0).random((5, 1, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=data)
    model = three_layer()
    report = check_parity(model, model, inputs=tmp_path / "in.npz")
    assert report.samples == 5 and report.passed


def test_npz_feeds_a_dynamic_batch_model(tmp_path) -> None:
    np.savez(tmp_path / "in.npz", input=np.random.default_rng(1).random((2, 3, 8, 8)).astype(np.float64))
    model = three_layer(batch="N")
    report = check_parity(model, model, inputs=str(tmp_path / "in.npz"))
    assert report.samples == 1 and report.passed
    (m,) = report.outputs.values()
    assert m.shape == (2, 4, 8, 8)


def test_npz_with_wrong_key_or_shape_is_a_usage_error(tmp_path) -> None:
    model = three_layer()
    np.savez(tmp_path / "key.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    np.savez(tmp_path / "shape.npz", input=np.zeros((1, 3, 9, 9), np.float32))
    with pytest.raises(UsageError, match="image"):
        check_parity(model, model, inputs=tmp_path / "key.npz")
    with pytest.raises(UsageError, match=r"\(1, 3, 9, 9\)"):
        check_parity(model, model, inputs=tmp_path / "shape.npz")


def test_unreadable_npz_is_unusable(tmp_path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    model = three_layer()
    with pytest.raises(UnusableInputError):
        check_parity(model, model, inputs=tmp_path / "bad.npz")
    with pytest.raises(UnusableInputError, match="no such file"):
        check_parity(model, model, inputs=tmp_path / "missing.npz")


def test_list_generator_dict_and_array_inputs() -> None:
    specs, ctx = specs_ctx(three_layer())
    rng = np.random.default_rng(2)
    batches = [{"input": rng.random((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    assert len(load_inputs(batches, specs, ctx)) == 3
    assert len(load_inputs(iter(batches), specs, ctx)) == 3
    assert len(load_inputs(batches[0], specs, ctx)) == 1
    assert len(load_inputs(batches[0]["input"], specs, ctx)) == 1
    with pytest.raises(UsageError):
        load_inputs([1, 2], specs, ctx)
    with pytest.raises(UsageError):
        load_inputs([], specs, ctx)


def test_num_samples_must_be_positive() -> None:
    model = three_layer()
    with pytest.raises(UsageError):
        check_parity(model, model, num_samples=0)


def test_model_with_integer_input_is_generated() -> None:
    b = QdqBuilder(name="int_in")
    x = b.input("codes", [1, 4], elem_type=onnx.TensorProto.UINT8)
    y = b.dequantize(x, 0.5, 0, "uint8", name="in")
    b.output(y)
    model = b.build()
    report = check_parity(model, model)
    assert report.passed


def test_candidate_with_different_input_count_is_a_usage_error() -> None:
    b = QdqBuilder(name="two_in")
    x = b.input("a", [1, 3, 8, 8])
    y = b.input("b", [1, 3, 8, 8])
    b.output(b.node("Add", [x, y]))
    with pytest.raises(UsageError, match="input"):
        check_parity(three_layer(), b.build())


def test_reference_that_is_not_a_model_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        check_parity(object(), three_layer())


def test_unnamed_graph_output_probe_ok() -> None:
    # a per-layer probe on a model whose nodes carry no names still reports a stable node label
    model = three_layer()
    for node in model.graph.node:
        node.name = ""
    report = check_parity(model, helper.make_model(model.graph, opset_imports=model.opset_import), per_layer=True)
    assert report.passed and all(layer.node for layer in report.layers)


def test_batches_as_tuples_in_input_order() -> None:
    b = QdqBuilder(name="two_in")
    x = b.input("a", [1, 4])
    y = b.input("b", [1, 4])
    b.output(b.node("Sub", [x, y]))
    model = b.build()
    specs, ctx = specs_ctx(model)
    a, c = np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32)
    (sample,) = load_inputs([(a, c)], specs, ctx)
    assert np.array_equal(sample["a"], a) and np.array_equal(sample["b"], c)
    with pytest.raises(UsageError, match="tuple of 2"):
        load_inputs([(a,)], specs, ctx)


def test_summary_line_gives_verdict_and_first_divergence() -> None:
    ref = three_layer()
    line = check_parity(ref, corrupt_scale(ref, MIDDLE, 1.7), per_layer=True).summary()
    assert line.startswith("FAILED") and "layer1_dq_DequantizeLinear_out" in line and "\n" not in line
    assert check_parity(ref, ref).summary().startswith("PASSED")


def test_shared_name_with_another_shape_is_noted_not_compared() -> None:
    def model(reshape: bool) -> onnx.ModelProto:
        b = QdqBuilder(name="mid")
        x = b.input("input", [1, 4])
        if reshape:
            mid = b.node("Reshape", [x, b.const(np.array([2, 2], dtype=np.int64), "shape")], name="mid")
        else:
            mid = b.node("Relu", [x], name="mid")
        b.output(b.node("ReduceSum", [mid], name="sum", keepdims=0))
        return b.build()

    report = check_parity(model(False), model(True), per_layer=True)
    assert report.passed  # random inputs are >= 0: Relu is the identity there
    assert "mid_out" not in [layer.tensor for layer in report.layers]
    assert any("mid_out" in note for note in report.notes)


def test_metrics_on_scalars() -> None:
    m = tensor_metrics(np.float32(2.0), np.float32(2.5), step=0.5)
    assert m.max_lsb == pytest.approx(1.0) and m.passed and m.shape == ()
