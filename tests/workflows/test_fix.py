"""fix(): the per-device pipeline, its contract (every finding validate marks fixable is gone afterwards), names,
parity, idempotence, and what it refuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from fixtures.models import tiny_conv
from tiexport.devices import DEVICES, get_device
from tiexport.errors import UnusableInputError, UsageError
from tiexport.passes.base import Pass, PassError, PassResult
from tiexport.passes.pipelines import fix_pipeline as build_pipeline
from tiexport.validators.report import Finding
from tiexport.validators.validate import validate
from tiexport.workflows.fix import FixError, FixReport, fix

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_MODELS = sorted((ROOT / "fixtures" / "models").glob("*.onnx"))

# tiny_conv mutations: each breaks one or several device rules (see fixtures/models.py for the keywords)
MUTATIONS: dict[str, dict[str, Any]] = {
    "clean": {},
    "scale_not_p2": {"act_scale": 0.03},
    "act_zp": {"act_zp": 3},
    "act_uint8_midpoint": {"act_zp": 128},
    "input_zp": {"in_zp": 10},
    "input_midpoint": {"in_zp": 128},
    "per_channel": {"w_per_channel": True},
    "weight_not_p2": {"w_p2": False},
    "weight_zp": {"w_zp": 2},
    "unfolded": {"w_folded": False},
    "float_bias": {"bias": "float"},
    "no_bias": {"bias": "none"},
    "dynamic_batch": {"batch": "N"},
    "opset19": {"opset": 19},
    "depthwise_5x5_s2": {"group": 3, "out_channels": 3, "kernel": 5, "stride": 2},
    "everything": {"act_scale": 0.03, "act_zp": 3, "in_zp": 10, "w_per_channel": True, "w_p2": False,
                   "w_zp": 2, "w_folded": False, "bias": "float", "batch": "N"},
}


def _findings(model: Any, device: str) -> list[Finding]:
    return validate(model, device).devices[get_device(device).name].findings


def _input_is_unusable(model: Any) -> bool:
    from tiexport.onnx_io import as_model
    from tiexport.workflows.fix import _unusable_because

    return bool(_unusable_because(as_model(model, load_external_data=True).model))


def _assert_fixable_findings_gone(model: Any, device: str) -> None:
    before = _findings(model, device)
    try:
        fixed, report = fix(model, device, parity=False)
    except UnusableInputError:
        assert _input_is_unusable(model), "fix refused a model that onnx.checker and ONNX Runtime accept"
        return
    # a scale <= 0 or NaN (TIDL011, not fixable) also fails the power-of-two test; no pass can repair it
    invalid_nodes = {f.node for f in before if f.rule_id == "TIDL011"}
    left = [f for f in _findings(fixed, device) if f.fixable and f.node not in invalid_nodes]
    assert not left, [f"{f.rule_id} {f.node}: {f.message}" for f in left]
    assert {f for f in report.remaining} == set(_findings(fixed, device))


# ----------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("path", FIXTURE_MODELS, ids=lambda p: p.stem)
def test_fixable_findings_are_gone_for_every_fixture_and_device(path: Path) -> None:
    for device in DEVICES:
        _assert_fixable_findings_gone(path, device)


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=str)
def test_fixable_findings_are_gone_for_tiny_conv_mutations(mutation: str) -> None:
    model = tiny_conv(**MUTATIONS[mutation])
    for device in DEVICES:
        _assert_fixable_findings_gone(model, device)


@pytest.fixture(scope="module")
def ort_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A torch CNN (conv/bn/relu, depthwise, residual add, concat, resize, pooling, linear) exported float with the
    TorchScript exporter and quantized with ONNX Runtime's quantize_static (QDQ, per-channel), plus variants."""
    pytest.importorskip("torch")
    from fixtures.torch_models import float_cnn_onnx, ort_quantize_static

    work = tmp_path_factory.mktemp("ort")
    float_path = float_cnn_onnx(work / "float.onnx")
    models = {
        "per_channel": ort_quantize_static(float_path, work / "qdq_pc.onnx", per_channel=True, num_batches=2),
        "per_tensor": ort_quantize_static(float_path, work / "qdq_pt.onnx", per_channel=False, num_batches=2),
    }
    dyn = onnx.load(str(models["per_channel"]))
    for vi in (*dyn.graph.input, *dyn.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    del dyn.graph.value_info[:]
    models["dynamic_batch"] = work / "qdq_dyn.onnx"
    onnx.save(dyn, str(models["dynamic_batch"]))
    return models


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["per_channel", "per_tensor", "dynamic_batch"])
def test_fixable_findings_are_gone_for_an_ort_quantize_static_model(ort_models: dict[str, Path],
                                                                     variant: str) -> None:
    for device in DEVICES:
        _assert_fixable_findings_gone(ort_models[variant], device)


@pytest.mark.torch
def test_ort_model_on_tda4vm_has_no_fixable_warnings_left(ort_models: dict[str, Path]) -> None:
    """TDA4VM imports an ORT per-channel affine model on its own grid (warnings); fix puts it on TDA4VM's grid."""
    before = _findings(ort_models["per_channel"], "TDA4VM")
    assert sum(f.fixable and f.severity == "warning" for f in before) > 10
    assert not [f for f in before if f.severity == "error"]
    fixed, report = fix(ort_models["per_channel"], "TDA4VM", num_samples=2)
    assert report.exit_code == 0 and not report.errors
    assert not [f for f in _findings(fixed, "TDA4VM") if f.fixable]
    assert {f.rule_id for f in before if f.fixable} >= {"TIDL020", "TIDL021", "TIDL022"}


def _concat_with_input(in_zp: int) -> onnx.ModelProto:
    """Concat(network input on an asymmetric grid, a conv branch on another asymmetric grid): the Concat alignment
    and the symmetric network input pull the same QuantizeLinear."""
    from fixtures.builders import QdqBuilder

    b = QdqBuilder(seed=4, name="concat_input")
    x = b.qdq(b.input("input", [1, 3, 8, 8]), 2.0**-7, in_zp, "uint8", name="input")
    w = b.weight(shape=(3, 3, 3, 3), per_channel=False, p2=True, name="conv_weight")
    y = b.qdq(b.conv(x, w, pads=[1, 1, 1, 1], name="conv"), 2.0**-5, 100, "uint8", name="conv")
    b.output(b.qdq(b.node("Concat", [x, y], axis=1, name="concat"), 2.0**-5, 100, "uint8", name="concat"))
    return b.build()


@pytest.mark.parametrize("in_zp", [10, 128])
def test_concat_alignment_and_symmetric_input_converge(in_zp: int) -> None:
    model = _concat_with_input(in_zp)
    for device in DEVICES:
        _, report = fix(model, device, parity=False)
        assert report.converged and report.iterations <= 2, device  # one rewriting round, one to confirm
        _assert_fixable_findings_gone(model, device)


# ----------------------------------------------------------------------------------------------- parity, names
@pytest.mark.torch
def test_exact_pipeline_keeps_outputs_bit_identical(ort_models: dict[str, Path]) -> None:
    _, report = fix(ort_models["per_channel"], "AM68A", num_samples=3)
    assert not report.numerics_changed
    assert report.bit_identical is True and report.parity_passed is True
    assert all(m["max_abs"] == 0 for m in report.parity["outputs"].values())  # type: ignore[index]


@pytest.mark.torch
def test_numerics_changing_pipeline_says_so_and_stays_close(ort_models: dict[str, Path]) -> None:
    _, report = fix(ort_models["per_channel"], "TDA4VM", num_samples=3)
    assert report.numerics_changed
    changed = {p.name for p in report.passes if p.numerics_changed}
    assert {"EnforcePowerOfTwoScalesPass", "ConvertPerChannelToPerTensorPass"} <= changed
    (metrics,) = report.parity["outputs"].values()  # type: ignore[index]
    assert report.bit_identical is False
    assert metrics["sqnr_db"] > 25 and metrics["cosine"] > 0.99


@pytest.mark.torch
def test_node_and_tensor_names_survive(ort_models: dict[str, Path]) -> None:
    model = onnx.load(str(ort_models["per_channel"]))
    fixed, _ = fix(model, "TDA4VM", parity=False)
    before = {n.name: n for n in model.graph.node}
    after = {n.name: n for n in fixed.graph.node}
    assert set(before) <= set(after)  # nothing was removed from this model
    for name, n in before.items():
        assert after[name].op_type == n.op_type
        assert list(after[name].output) == list(n.output)
    assert [i.name for i in fixed.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in fixed.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.torch
def test_fixing_a_fixed_ort_model_changes_nothing(ort_models: dict[str, Path]) -> None:
    fixed, _ = fix(ort_models["dynamic_batch"], "TDA4VM", parity=False)
    _, report = fix(fixed, "TDA4VM", parity=False)
    assert report.changes == 0 and report.iterations == 1


def test_public_api_is_lazy_and_torch_free() -> None:
    import tiexport

    assert tiexport.fix is fix and tiexport.FixReport is FixReport


def test_new_node_names_derive_from_old_ones() -> None:
    model = tiny_conv(bias="float", w_folded=False)
    fixed, _ = fix(model, "TDA4VM", parity=False)
    old = {n.name for n in model.graph.node} | {t.name for t in model.graph.initializer}
    for n in fixed.graph.node:
        assert n.name in old or any(n.name.startswith(o) for o in old), n.name


# ----------------------------------------------------------------------------------------------- behaviour
def test_returns_a_model_and_a_report() -> None:
    fixed, report = fix(tiny_conv(act_scale=0.03), "j721e", parity=False)
    assert isinstance(fixed, onnx.ModelProto) and isinstance(report, FixReport)
    assert report.device == "TDA4VM"
    assert [p.name for p in report.passes] == [p.name for p in build_pipeline("TDA4VM")]
    assert report.changes > 0 and report.converged


def test_the_input_model_is_not_modified() -> None:
    model = tiny_conv(act_scale=0.03, w_folded=False, batch="N")
    data = model.SerializeToString()
    fix(model, "TDA4VM", parity=False)
    assert model.SerializeToString() == data


def test_a_fixed_model_is_a_fixed_point() -> None:
    fixed, _ = fix(tiny_conv(**MUTATIONS["everything"]), "TDA4VM", parity=False)
    again, report = fix(fixed, "TDA4VM", parity=False)
    assert report.changes == 0 and report.iterations == 1
    assert again.graph == fixed.graph


def test_parity_on_given_inputs() -> None:
    model = tiny_conv(act_zp=128)
    feed = {"input": np.random.default_rng(0).random((3, 1, 3, 8, 8), dtype=np.float32)}  # 3 samples
    _, report = fix(model, "TDA4VM", inputs=feed)
    assert report.parity is not None and report.parity["samples"] == 3
    assert report.bit_identical is True  # uint8 zp 128 -> int8 zp 0 is the same grid


def test_parity_is_skipped_with_a_reason_when_an_input_stays_dynamic() -> None:
    _, report = fix(tiny_conv(size="H"), "AM68A")
    assert report.parity is not None and "dynamic dims" in report.parity["skipped"]
    assert "--input-shape" in report.parity["skipped"]
    assert report.parity_passed is None


def test_input_shapes_option_pins_the_shape() -> None:
    fixed, report = fix(tiny_conv(batch="N", size="H"), "AM68A", input_shapes={"input": [1, 3, 8, 8]})
    dims = [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 8, 8]
    assert report.parity_passed is True
    assert not [f for f in report.remaining if f.category == "static_shape"]


def test_quantize_bias_follows_the_profile_unless_overridden() -> None:
    model = tiny_conv(bias="float")

    def has_bias_dq(m: onnx.ModelProto) -> bool:
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        return any(n.op_type == "DequantizeLinear" and n.output[0] == conv.input[2] for n in m.graph.node)

    assert not has_bias_dq(fix(model, "AM68A", parity=False)[0])
    assert has_bias_dq(fix(model, "AM68A", quantize_bias=True, parity=False)[0])
    assert not has_bias_dq(fix(model, "TDA4VM", parity=False)[0])  # off in every profile, as in TI's optimizer
    assert has_bias_dq(fix(model, "TDA4VM", quantize_bias=True, parity=False)[0])
    assert not has_bias_dq(fix(model, "TDA4VM", quantize_bias=False, parity=False)[0])


def test_remaining_errors_give_exit_code_1() -> None:
    _, report = fix(tiny_conv(opset=21), "AM68A", parity=False)
    assert report.exit_code == 1
    assert any(f.rule_id == "TIDL003" for f in report.errors)


# ----------------------------------------------------------------------------------------------- pipeline
def _names(passes: list[Pass]) -> list[str]:
    return [repr(p) for p in passes]


def test_pipeline_depends_on_profile_fields_not_names() -> None:
    tda4vm = get_device("TDA4VM")
    renamed = dataclasses.replace(tda4vm, name="SomeFutureSoC", soc="x", aliases=())
    assert _names(build_pipeline(renamed)) == _names(build_pipeline(tda4vm))
    mmav2_p2 = dataclasses.replace(get_device("AM68A"), name="P2Chip", power_of_two_scales=True)
    names = [p.name for p in build_pipeline(mmav2_p2)]
    assert "EnforcePowerOfTwoScalesPass" in names
    assert "EnforcePowerOfTwoScalesPass" not in [p.name for p in build_pipeline("AM68A")]


def test_device_without_accelerator_gets_only_exact_passes() -> None:
    names = {p.name for p in build_pipeline("AM62")}
    assert not names & {"EnforcePowerOfTwoScalesPass", "EnforceSymmetricPass", "AlignConcatScalesPass",
                        "ConvertPerChannelToPerTensorPass", "AlignBiasScalePass", "QuantizeBiasPass"}


@pytest.mark.parametrize("device", [None, "all", ["TDA4VM", "AM68A"], "NoSuchChip"])
def test_bad_device_is_a_usage_error(device: Any) -> None:
    with pytest.raises(UsageError):
        fix(tiny_conv(), device)


def test_bad_power_of_two_mode_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="ceil"):
        fix(tiny_conv(), "TDA4VM", power_of_two="floor")


class _BreakGraphPass(Pass):
    """Renames the Conv to an op type no runtime knows: the result must not be handed back."""

    def run(self, graph: gs.Graph) -> PassResult:
        conv = next((n for n in graph.nodes if n.op == "Conv"), None)
        if conv is None:
            return PassResult(graph, modified=False)
        conv.op = "NoSuchOp"
        return PassResult(graph, modified=True, changes=1)


class _RaisingPass(Pass):
    def run(self, graph: gs.Graph) -> PassResult:
        raise RuntimeError("boom")


def test_a_broken_result_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiexport.workflows.fix as fix_module

    monkeypatch.setattr(fix_module, "fix_pipeline", lambda *a, **k: [_BreakGraphPass()])
    with pytest.raises(FixError, match="nothing written"):
        fix(tiny_conv(), "AM68A")


def test_a_failing_pass_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiexport.workflows.fix as fix_module

    monkeypatch.setattr(fix_module, "fix_pipeline", lambda *a, **k: [*build_pipeline("AM68A")[:2], _RaisingPass()])
    with pytest.raises(PassError, match=r"_RaisingPass failed .*DowngradeIrVersionPass, PinInputShapesPass"):
        fix(tiny_conv(), "AM68A")


def test_an_input_that_onnx_runtime_rejects_is_unusable() -> None:
    model = tiny_conv(act_dtype="int16")  # int16 QuantizeLinear needs opset 21
    with pytest.raises(UnusableInputError, match="already fails"):
        fix(model, "AM68A")


def test_report_dict_and_text() -> None:
    _, report = fix(tiny_conv(act_scale=0.03), "TDA4VM", num_samples=2)
    d = report.to_dict()
    assert {"model", "output", "device", "passes", "parity", "remaining_findings"} <= set(d)
    assert all(set(p) == {"name", "changes", "numerics_changed"} for p in d["passes"])
    text = report.to_text()
    assert "EnforcePowerOfTwoScalesPass" in text and "numerics changed" in text and "parity vs input (2 sample(s), tolerance 1 LSB)" in text


def test_exact_fix_checks_parity_on_one_sample_numeric_fix_on_all() -> None:
    from fixtures.rule_fixtures import RULE_FIXTURES

    _, exact = fix(RULE_FIXTURES["TIDL031_dq_q_same_params"][0](), "AM68A")
    assert not exact.numerics_changed and exact.parity["samples"] == 1 and exact.bit_identical is True
    assert any("one sample" in n for n in exact.notes)
    _, rounded = fix(tiny_conv(act_scale=0.03), "TDA4VM", num_samples=3)
    assert rounded.numerics_changed and rounded.parity["samples"] == 3


# ----------------------------------------------------------------------------------------------- unchanged graphs
def test_an_unchanged_graph_is_identical_by_construction_without_running(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiexport.parity as parity_mod

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parity ran on a graph fix did not change")

    model, _ = fix(tiny_conv(), "AM68A", parity=False)  # already fixed: a second fix has nothing to rewrite
    monkeypatch.setattr(parity_mod, "check_parity", no_run)
    _, report = fix(model, "AM68A")
    assert not report.numerics_changed
    assert report.parity == {"identical_computation": True, "samples": 0}
    assert report.parity_passed is True and report.bit_identical is True
    assert "bit-identical by construction" in report.to_text()


def test_given_inputs_still_run_parity_on_an_unchanged_graph() -> None:
    feed = {"input": np.random.default_rng(1).random((2, 1, 3, 8, 8), dtype=np.float32)}
    model, _ = fix(tiny_conv(), "AM68A", parity=False)
    _, report = fix(model, "AM68A", inputs=feed)
    assert report.parity is not None and report.parity["samples"] == 2 and report.bit_identical is True


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    from tiexport.parity.structural import same_computation as _same_computation

    return _same_computation(a, b)


def test_same_computation_ignores_node_order_and_annotations() -> None:
    model = tiny_conv()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    nodes = list(other.graph.node)
    del other.graph.node[:]
    other.graph.node.extend(reversed(nodes))
    other.graph.value_info.add().name = "annotation_only"
    for n in other.graph.node:
        n.name = n.name + "_renamed"
    assert _same(model, other)


@pytest.mark.parametrize("change", ["weight_byte", "attribute", "output_order", "input_type", "opset",
                                    "duplicate_initializer", "function"])
def test_same_computation_sees_a_change(change: str) -> None:
    model = tiny_conv(bias="none")
    other = onnx.ModelProto()
    other.CopyFrom(model)
    g = other.graph
    if change == "weight_byte":
        t = next(t for t in g.initializer if len(onnx.numpy_helper.to_array(t).ravel()) > 4)
        arr = onnx.numpy_helper.to_array(t).copy()
        arr.ravel()[0] += 1
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    elif change == "attribute":
        conv = next(n for n in g.node if n.op_type == "Conv")
        pads = next(a for a in conv.attribute if a.name == "pads")
        pads.ints[0] += 1
    elif change == "output_order":
        g.output.add().CopyFrom(g.output[0])
        g.output[-1].name = g.node[0].output[0]
    elif change == "input_type":
        g.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    elif change == "duplicate_initializer":
        first = g.initializer[0]
        g.initializer.add().CopyFrom(first)  # one name twice, one other tensor gone: the counts still match
        del g.initializer[1]
    elif change == "function":
        other.functions.add().CopyFrom(onnx.helper.make_function("local", "F", ["x"], ["y"],
                                                                 [onnx.helper.make_node("Relu", ["x"], ["y"])],
                                                                 [onnx.helper.make_opsetid("", 17)]))
    else:
        other.opset_import[0].version += 1
    assert not _same(model, other)


# ----------------------------------------------------------------------------------------------- output
def test_output_is_written_with_the_checked_bytes(tmp_path: Path) -> None:
    from tiexport.onnx_io import serialize

    src = tmp_path / "in.onnx"
    onnx.save(tiny_conv(act_scale=0.03), str(src))
    out = tmp_path / "out.onnx"
    fixed, report = fix(str(src), "TDA4VM", num_samples=1, output=out)
    assert out.read_bytes() == serialize(fixed) and report.output == str(out)


def test_output_never_overwrites_the_input_unless_protect_is_empty(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(tiny_conv(act_scale=0.03), str(src))
    data = src.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        fix(str(src), "TDA4VM", parity=False, output=src)
    assert src.read_bytes() == data
    fixed, _ = fix(str(src), "TDA4VM", parity=False, output=src, protect=())
    assert onnx.load(str(src)).graph == fixed.graph


def test_parity_reuses_the_load_check_session() -> None:
    from tiexport.parity import check_parity, ort_session

    model = tiny_conv(act_scale=0.03)
    fixed, _ = fix(model, "TDA4VM", parity=False)
    session = ort_session(fixed.SerializeToString())
    calls = []
    real_run = session.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_run(*args, **kwargs)

    session.run = counting_run
    with_session = check_parity(model, fixed, num_samples=2, candidate_session=session)
    without = check_parity(model, fixed, num_samples=2)
    assert len(calls) == 2  # both samples ran on the given session
    assert with_session.to_dict()["outputs"] == without.to_dict()["outputs"]


def test_fix_text_lists_a_few_nodes_per_rule() -> None:
    """Readable on a 300-node model: five nodes per rule, then a count (the JSON keeps all)."""
    from tiexport.validators.report import Finding
    from tiexport.workflows.fix import FixReport

    remaining = [Finding("TIDL040", "unsupported_op", "warning", f"n{i}", "Range", "Range runs on Arm", "")
                 for i in range(40)]
    remaining.append(Finding("TIDL014", "qdq_coverage", "error", "mm", "MatMul", "no Q/DQ", ""))
    report = FixReport(model="m.onnx", device="AM68A", passes=[], iterations=1, converged=True, remaining=remaining)
    text = report.to_text()
    assert sum("TIDL040 n" in line for line in text.splitlines()) == 5
    assert "... and 35 more TIDL040" in text and "error TIDL014 mm: no Q/DQ" in text
    assert sum("TIDL040 n" in line for line in report.to_text(max_nodes=None).splitlines()) == 40
    assert len(report.to_dict()["remaining_findings"]) == 41
