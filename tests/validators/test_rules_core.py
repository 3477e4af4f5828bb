"""Each quantization/structure rule: its fixture violates exactly that rule on its target device (whole findings
compared), and the clean base model has no finding on any device."""

from __future__ import annotations

import numpy as np
import pytest

import tiexport
from fixtures.models import tiny_conv
from fixtures.rule_fixtures import RULE_FIXTURES
from tiexport.devices import DEVICES
from tiexport.tidl_spec import sources as src
from tiexport.validators.report import Finding as F


def OPS_ROW(line: int) -> str:
    """The citation of a row of the 11.0 operator table (docs/supported_ops_rts_versions.md)."""
    return src.DocRef(src.TOOLS_REPO, "rel_11_00", src.OPS_DOC, line).cite()


EXPECTED: dict[str, list[F]] = {
    'TIDL001_checker': [
        F('TIDL001', 'structure', 'error', '', '',
          'onnx.checker: input_q_scale in initializer but not in graph input',
          're-export the model or repair the node the checker names', False, src.ONNX_IR_SPEC, False),
    ],
    'TIDL002_shadowed_initializer': [
        F('TIDL002', 'structure', 'warning', 'conv_weight_quantized', 'initializer',
          "initializer 'conv_weight_quantized' is also a graph input, so a runtime may override it with fed data",
          're-export without keep_initializers_as_inputs (TIDL treats it as a variable input)', False, src.ONNX_IR_SPEC, False),
    ],
    'TIDL003_opset21': [
        F('TIDL003', 'opset', 'error', '', '',
          "opset 21 is newer than TIDL 11.0's ONNX Runtime reads (up to 19)",
          "re-export with opset_version=17 (what TI's v2 exports use)", False, OPS_ROW(134), False),
    ],
    'TIDL004_dynamic_batch': [
        F('TIDL004', 'static_shape', 'error', 'input', 'input',
          "input 'input' has shape [Nx3x8x8]: dimension(s) 0 not fixed and > 0",
          'tiexport fix pins a dynamic batch to 1', True, src.OSRT_INFER_SHAPES, False),
    ],
    'TIDL005_runtime_reshape': [
        F('TIDL005', 'static_shape', 'error', 'reshape', 'Reshape',
          "output 'reshape_out' has no static shape after shape inference (got ('unk__0', 'unk__1'))",
          'make the shape computation constant (e.g. a constant Reshape shape)', False, src.OSRT_INFER_SHAPES, False),
    ],
    'TIDL010_float_model': [
        F('TIDL010', 'not_prequantized', 'error', '', '',
          'float model: no QuantizeLinear/DequantizeLinear nodes, so prequantized_model: 1 has nothing to read; TIDL would calibrate it itself and your PyTorch quantization would not be used',
          'export the PTC/QAT fake-quant model with tiexport.export, or compile as a float model (runtime_options_onnx_np2, accuracy_level 1) without prequantized_model', False, src.QUANT_PREQUANTIZED_QDQ, False),
    ],
    'TIDL011_negative_scale': [
        F('TIDL011', 'invalid_qparams', 'error', 'relu_dq_DequantizeLinear', 'DequantizeLinear',
          'scale must be positive and finite, found [-0.0625]',
          're-export the model; scales must be positive finite float32 constants', False, src.ONNX_QDQ_SPEC, False),
        F('TIDL011', 'invalid_qparams', 'error', 'relu_q_QuantizeLinear', 'QuantizeLinear',
          'scale must be positive and finite, found [-0.0625]',
          're-export the model; scales must be positive finite float32 constants', False, src.ONNX_QDQ_SPEC, False),
    ],
    'TIDL012_int16': [
        F('TIDL012', 'bit_width', 'error', 'relu_dq_DequantizeLinear', 'DequantizeLinear',
          "quantized type is int16; TIDL's prequantized import takes 8-bit only",
          "quantize to int8/uint8; for 16-bit layers use TIDL's output_feature_16bit_names_list instead", False, src.QUANT_8BIT_ONLY, False),
        F('TIDL012', 'bit_width', 'error', 'relu_q_QuantizeLinear', 'QuantizeLinear',
          "quantized type is int16; TIDL's prequantized import takes 8-bit only",
          "quantize to int8/uint8; for 16-bit layers use TIDL's output_feature_16bit_names_list instead", False, src.QUANT_8BIT_ONLY, False),
    ],
    'TIDL013_weight_axis': [
        F('TIDL013', 'qdq_axis', 'error', 'conv_weight_DequantizeLinear', 'DequantizeLinear',
          "weight of Conv 'conv' quantized along axis 1, its output channels are axis 0",
          'quantize the weight per channel along axis 0', False, src.LAYER_QUANT_TABLE, False),
    ],
    'TIDL014_float_input': [
        F('TIDL014', 'qdq_coverage', 'error', 'conv', 'Conv',
          "input 'input' is float: no DequantizeLinear before this layer",
          "quantize this layer's input (add an activation fake-quant in PyTorch)", False, src.LAYER_QUANT_TABLE, False),
    ],
    'TIDL020_not_power_of_two': [
        F('TIDL020', 'power_of_two', 'warning', 'relu_dq_DequantizeLinear', 'DequantizeLinear',
          '1 of 1 scale(s) not a power of two (0.03); TDA4VM quantizes with power-of-2 scales, so TIDL changes these at import',
          'tiexport fix --device TDA4VM (rounds up to 2**ceil(log2(s))), or train with WT8SYMP2_AT8SYMP2', True, src.TDA4VM_P2_TORCHMODELOPT, False),
        F('TIDL020', 'power_of_two', 'warning', 'relu_q_QuantizeLinear', 'QuantizeLinear',
          '1 of 1 scale(s) not a power of two (0.03); TDA4VM quantizes with power-of-2 scales, so TIDL changes these at import',
          'tiexport fix --device TDA4VM (rounds up to 2**ceil(log2(s))), or train with WT8SYMP2_AT8SYMP2', True, src.TDA4VM_P2_TORCHMODELOPT, False),
    ],
    'TIDL021_asymmetric_activation': [
        F('TIDL021', 'symmetric', 'warning', 'relu_dq_DequantizeLinear', 'DequantizeLinear',
          "activation zero point 3: TDA4VM does not support asymmetric quantization; TI's model zoo deploys such a model on TDA4VM (cl-6508, per-channel affine QAT v2): TIDL imports it on its own grid, so TIDL's outputs differ from this model's",
          'tiexport fix --device TDA4VM; in PyTorch use WT8SYMP2_AT8SYMP2', True, src.QUANT_ASYMMETRIC, False),
        F('TIDL021', 'symmetric', 'warning', 'relu_q_QuantizeLinear', 'QuantizeLinear',
          "activation zero point 3: TDA4VM does not support asymmetric quantization; TI's model zoo deploys such a model on TDA4VM (cl-6508, per-channel affine QAT v2): TIDL imports it on its own grid, so TIDL's outputs differ from this model's",
          'tiexport fix --device TDA4VM; in PyTorch use WT8SYMP2_AT8SYMP2', True, src.QUANT_ASYMMETRIC, False),
    ],
    'TIDL021_asymmetric_weight': [
        F('TIDL021', 'symmetric', 'error', 'conv_weight_DequantizeLinear', 'DequantizeLinear',
          'weight zero point 2: TIDL weights are symmetric (zero point 0)',
          'tiexport fix requantizes the weight symmetric; in PyTorch use a symmetric weight observer', True, src.LAYER_QUANT_TABLE, False),
    ],
    'TIDL022_per_channel': [
        F('TIDL022', 'per_channel', 'warning', 'conv_weight_DequantizeLinear', 'DequantizeLinear',
          "per-channel weight (4 scales): TDA4VM does not support per-channel quantization; TI's model zoo deploys such a model on TDA4VM (cl-6508, per-channel affine QAT v2): TIDL imports it on its own grid, so TIDL's outputs differ from this model's",
          'tiexport fix --device TDA4VM, or train with WT8SYMP2_AT8SYMP2', True, src.DEVICE_FEATURES, False),
    ],
    'TIDL023_input_zero_point': [
        F('TIDL023', 'input_quantization', 'warning', 'input_q_QuantizeLinear', 'QuantizeLinear',
          "input 'input' quantized with zero point 10; TIDL's input data-convert layer is symmetric only",
          'tiexport fix --device AM68A', True, src.LAYER_QUANT_TABLE, False),
    ],
    'TIDL024_matmul_sign': [
        F('TIDL024', 'matmul_sign', 'warning', 'matmul', 'MatMul',
          'signed inputs with an unsigned (uint8) output; runs on Arm',
          'quantize the MatMul output as int8', False, OPS_ROW(18), False),
    ],
    'TIDL030_unfolded_weight': [
        F('TIDL030', 'unfolded_weight', 'warning', 'conv_weight_q_QuantizeLinear', 'QuantizeLinear',
          "float constant 'conv_weight' is quantized at run time",
          'tiexport fix folds it into an int8 initializer (bit-exact)', True, src.OPTIMIZER_FOLD_WEIGHTS, False),
    ],
    'TIDL031_dq_q_same_params': [
        F('TIDL031', 'redundant_qdq', 'warning', 'again_q_QuantizeLinear', 'QuantizeLinear',
          "re-quantizes the output of 'relu_dq_DequantizeLinear' with the same scale and zero point",
          'tiexport fix removes it (exact)', True, '', True),
    ],
    'TIDL032_concat_scales': [
        F('TIDL032', 'scale_mismatch', 'warning', 'concat', 'Concat',
          'inputs on different scales (0.0625, 0.125); TIDL requantizes them',
          'tiexport fix --align-scales aligns them to the largest scale (changes numerics)', False, '', True),
    ],
    'TIDL033_bias_scale': [
        F('TIDL033', 'bias', 'warning', 'conv', 'Conv',
          'bias scale differs from input scale x weight scale: TIDL requantizes it to its accumulator scale',
          'requantize the bias with scale s_in * s_w', True, '', True),
    ],
}


def test_every_rule_fixture_has_expected_findings() -> None:
    assert set(EXPECTED) == set(RULE_FIXTURES)


@pytest.mark.parametrize("stem", sorted(RULE_FIXTURES))
def test_rule_fixture_violates_exactly_its_rule(stem: str) -> None:
    build, device = RULE_FIXTURES[stem]
    findings = tiexport.validate(build(), device).devices[device].findings
    if stem == "TIDL005_runtime_reshape":  # a runtime Reshape shape also trips the Reshape op rule
        findings = [f for f in findings if f.rule_id == "TIDL005"]
    assert findings == EXPECTED[stem]


@pytest.mark.parametrize("device", list(DEVICES))
def test_clean_base_has_no_findings(device: str) -> None:
    report = tiexport.validate(tiny_conv(), device)
    findings = [f for f in report.devices[device].findings if f.severity != "info"]
    assert findings == []
    assert report.devices[device].verdict == "compatible"


@pytest.mark.parametrize(
    ("stem", "clean_device"),
    [
        ("TIDL020_not_power_of_two", "AM68A"),  # power-of-2 is TDA4VM only
        ("TIDL021_asymmetric_activation", "AM69A"),  # asymmetric activations are fine on MMAv2
        ("TIDL022_per_channel", "AM62A"),  # per-channel weights are fine on MMAv2
    ],
)
def test_device_specific_rules_pass_on_other_devices(stem: str, clean_device: str) -> None:
    build, _ = RULE_FIXTURES[stem]
    assert tiexport.validate(build(), clean_device).devices[clean_device].findings == []


def test_uint8_zero_point_128_is_called_out_as_exact_int8() -> None:
    report = tiexport.validate(tiny_conv(act_zp=128), "TDA4VM")
    messages = [f.message for f in report.findings if f.rule_id == "TIDL021"]
    assert messages and all("uint8 with zero point 128 is exactly int8 with zero point 0" in m for m in messages)


def test_asymmetric_tensor_into_symmetric_only_layer_is_info_on_mmav2() -> None:
    """TI's per-layer table (11.2 docs) lists MaxPool activations as symmetric, but TI's own default MSA_WC8_AT8
    exports feed pooling asymmetric tensors and TI deploys them: a numerics note, not a warning."""
    from fixtures.builders import QdqBuilder

    b = QdqBuilder(seed=3)
    x = b.qdq(b.input("input", [1, 4, 8, 8]), 2.0**-6, 0, "int8", name="input")
    y = b.qdq(b.node("Sigmoid", [x], name="sig"), 2.0**-8, 7, "uint8", name="sig")
    y = b.qdq(b.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2], name="pool"), 2.0**-8, 7, "uint8",
              name="pool")
    b.output(y)
    findings = [f for f in tiexport.validate(b.build(), "AM68A").findings if f.rule_id == "TIDL021"]
    assert [(f.node, f.severity, f.source) for f in findings] == [
        ("sig_dq_DequantizeLinear", "info", src.LAYER_QUANT_TABLE)]
    assert "MaxPool" in findings[0].message


def test_float_model_gets_exactly_one_finding() -> None:
    build, _ = RULE_FIXTURES["TIDL010_float_model"]
    for device in ("TDA4VM", "AM68A"):
        findings = tiexport.validate(build(), device).devices[device].findings
        assert [f.category for f in findings if f.severity != "info"] == ["not_prequantized"]


def test_bias_beyond_16_bits_warns_on_tda4vm_only() -> None:
    model = tiny_conv(in_scale=2.0**-14)  # tiny input scale -> large int32 bias values
    tda = [f for f in tiexport.validate(model, "TDA4VM").findings if f.rule_id == "TIDL033"]
    am68a = [f for f in tiexport.validate(model, "AM68A").findings if f.rule_id == "TIDL033"]
    assert [f.severity for f in tda] == ["warning"] and "16 bits" in tda[0].message
    assert am68a == []


def _gelu_model(internal_qdq: bool, in_zp: int = 0, in_dtype: str = "int8") -> object:
    from fixtures.builders import QdqBuilder

    b = QdqBuilder(seed=4)
    x = b.qdq(b.input("input", [1, 8, 16]), 2.0**-5, in_zp, in_dtype, name="input")
    h = b.node("Div", [x, b.const(np.float32(1.4142135), "sqrt2")], name="gelu_div")
    h = b.node("Erf", [h], name="gelu_erf")
    h = b.node("Add", [h, b.const(np.float32(1.0), "one")], name="gelu_add")
    h = b.node("Mul", [x, h], name="gelu_mul")
    if internal_qdq:
        h = b.qdq(h, 2.0**-5, 0, "int8", name="gelu_mid")
    h = b.node("Mul", [h, b.const(np.float32(0.5), "half")], name="gelu_mul_half")
    b.output(b.qdq(h, 2.0**-5, 0, "int8", name="gelu_out"))
    return b.build()


def test_decomposed_gelu_needs_qdq_only_at_its_end() -> None:
    report = tiexport.validate(_gelu_model(internal_qdq=False), "AM68A")
    assert [f for f in report.findings if f.rule_id == "TIDL014"] == []


def test_layer_inside_pattern_reading_float_from_outside_is_still_flagged() -> None:
    from fixtures.builders import QdqBuilder

    b = QdqBuilder(seed=4)
    x = b.input("input", [1, 8, 16])  # not quantized at all
    h = b.node("Erf", [b.node("Div", [x, b.const(np.float32(1.4142135), "sqrt2")], name="gelu_div")],
               name="gelu_erf")
    b.output(b.qdq(h, 2.0**-5, 0, "int8", name="out"))
    flagged = [(f.node, f.severity) for f in tiexport.validate(b.build(), "AM68A").findings if f.rule_id == "TIDL014"]
    assert ("gelu_div", "error") in flagged


def test_matmul_with_constant_weight_is_not_a_sign_mix_on_tda4vm() -> None:
    from fixtures.builders import QdqBuilder

    b = QdqBuilder(seed=5)
    x = b.qdq(b.input("input", [1, 4, 16]), 2.0**-4, 0, "uint8", name="input")
    w = b.weight(shape=(16, 8), per_channel=False, p2=True, name="fc_weight")
    b.output(b.qdq(b.node("MatMul", [x, w], name="fc"), 2.0**-3, 0, "int8", name="fc"))
    assert [f for f in tiexport.validate(b.build(), "TDA4VM").findings if f.rule_id == "TIDL024"] == []


def test_asymmetric_input_of_a_fused_gelu_is_not_an_eltwise_warning() -> None:
    model = _gelu_model(internal_qdq=False, in_zp=100, in_dtype="uint8")
    assert [f for f in tiexport.validate(model, "AM68A").findings if f.rule_id == "TIDL021"] == []


def test_float_bias_beyond_16_bits_is_also_reported_on_tda4vm() -> None:
    model = tiny_conv(bias="float", in_scale=2.0**-14)  # TIDL quantizes the float bias itself, then clips it
    clipped = [f for f in tiexport.validate(model, "TDA4VM").findings if f.rule_id == "TIDL033" and "16 bits" in f.message]
    assert [f.severity for f in clipped] == ["warning"]
    assert not [f for f in tiexport.validate(tiny_conv(bias="float"), "TDA4VM").findings if "16 bits" in f.message]


@pytest.mark.parametrize("stem", sorted(RULE_FIXTURES))
def test_device_independent_rules_really_ignore_the_device(stem: str) -> None:
    """validate shares these rules' findings across devices; each must give the same findings for every device."""
    from tiexport.context import ModelContext
    from tiexport.onnx_io import as_model
    from tiexport.validators.registry import RULES

    ctx = ModelContext(as_model(RULE_FIXTURES[stem][0]()))
    for rule in (r for r in RULES if r.device_independent):
        results = {name: list(rule.check(ctx, p)) for name, p in DEVICES.items() if p.accelerator}
        assert len({tuple(v) for v in results.values()}) == 1, rule.id


def _clip_chain(opset: int, lo: float, hi: float, n: int = 3) -> object:
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "input"
    for i in range(n):
        inits.append(numpy_helper.from_array(np.full((3, 3, 1, 1), 0.1, np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        if opset < 11:
            nodes.append(helper.make_node("Clip", [f"c{i}"], [f"r{i}"], name=f"clip{i}", min=lo, max=hi))
        else:
            inits += [numpy_helper.from_array(np.array(lo, np.float32), f"lo{i}"),
                      numpy_helper.from_array(np.array(hi, np.float32), f"hi{i}")]
            nodes.append(helper.make_node("Clip", [f"c{i}", f"lo{i}", f"hi{i}"], [f"r{i}"], name=f"clip{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "v1", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=5 if opset < 11 else 8)


@pytest.mark.parametrize("opset", [10, 11])
def test_ti_qat_v1_model_is_recognized_not_refused(opset: int) -> None:
    """Power-of-2 Clip ranges after every layer and no Q/DQ: TI's QAT v1 format (opset 11 as TI's v1 docs export;
    attributes before opset 11). An info naming the format on every device, never the float-model error."""
    report = tiexport.validate(_clip_chain(opset, 0.0, 4.0), "all")
    for name, dev in report.devices.items():
        if name == "AM62":
            continue
        assert [(f.rule_id, f.severity) for f in dev.findings] == [("TIDL010", "info")], name
        assert dev.findings[0].message.startswith("TIDL QAT v1 model (3 Clip nodes at power-of-2 ranges")
    assert report.devices["TDA4VM"].findings[0].source == src.QAT_V1_DOC
    assert report.devices["AM68A"].findings[0].source == src.BENCHMARK_QAT_V1_CONFIG


def test_relu6_clips_are_not_qat_v1() -> None:
    """ReLU6 (Clip 0..6) is a float model's activation, not a power-of-2 range: still the float-model error."""
    findings = tiexport.validate(_clip_chain(17, 0.0, 6.0), "AM68A").findings
    assert [(f.rule_id, f.severity) for f in findings if f.rule_id == "TIDL010"] == [("TIDL010", "error")]


def test_one_element_bias_scale_with_default_axis_is_a_hygiene_note() -> None:
    """What ONNX Runtime's quantize_static and TI's v2 exports write for an int32 bias: a [1] scale, a scalar zero
    point, no axis (default 1) on a rank-1 input. Per-tensor in effect: one info per node, fixed exactly."""
    import onnx
    from onnx import numpy_helper

    from tiexport.workflows.fix import fix

    model = tiny_conv()
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "bias" in n.name)
    inits = {i.name: i for i in model.graph.initializer}
    scale = numpy_helper.to_array(inits[dq.input[1]]).ravel()
    assert np.all(scale == scale[0])  # per-tensor weight: one bias scale s_in * s_w, written per channel here
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale[:1].astype(np.float32), dq.input[1]))
    if len(dq.input) > 2:
        zp = numpy_helper.to_array(inits[dq.input[2]]).ravel()[0]
        inits[dq.input[2]].CopyFrom(numpy_helper.from_array(np.asarray(zp), dq.input[2]))
    for a in dq.attribute:
        if a.name == "axis":
            dq.attribute.remove(a)
            break
    onnx.checker.check_model(model, full_check=True)
    findings = [f for f in tiexport.validate(model, "all").findings if f.rule_id == "TIDL011"]
    assert {(f.node, f.severity, f.fixable) for f in findings} == {(dq.name, "info", True)}
    assert findings[0].message == ("zero point shape [] vs scale shape [1]; one-element scale with axis 1 on a "
                                   "rank-1 input: per-tensor in effect")
    fixed, report = fix(model, "AM68A", num_samples=2)
    assert not [f for f in tiexport.validate(fixed, "AM68A").findings if f.rule_id == "TIDL011"]
    assert report.bit_identical is True
