"""Operator rules (TIDL040, TIDL041, TIDL050-TIDL075): each violating fixture gives exactly its finding (whole
Finding compared) on every accelerator device and only the "no accelerator" info on AM62; each clean fixture gives
nothing; node_support covers the constraints the fixtures do not; partition and the subgraph limits."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

import tiexport
from fixtures.builders import QdqBuilder
from fixtures.op_fixtures import OP_FIXTURES, ceil_chain, relu_chain
from tiexport.context import ModelContext
from tiexport.devices import DEVICES, get_device
from tiexport.onnx_io import as_model
from tiexport.validators.registry import RULES
from tiexport.validators.report import Finding as F
from tiexport.validators.rules.ops import OP_CONSTRAINT_RULES, node_support, partition

ARM = "; runs on Arm (ONNX Runtime)"
ACCELERATED = [name for name, p in DEVICES.items() if p.accelerator]
AM62_INFO = F("TIDL040", "unsupported_op", "info", "", "",
              "AM62 has no TIDL accelerator: the whole model runs in ONNX Runtime on Arm",
              "choose an AM6xA/TDA4 device for acceleration", False)


def C(rule_id: str, node: str, op_type: str, message: str, hint: str) -> F:
    """An op_constraint finding: always a warning, never fixable, message ending in where the node runs."""
    return F(rule_id, "op_constraint", "warning", node, op_type, message + ARM, hint, False)


def _ceil(node: str) -> F:
    return F("TIDL040", "unsupported_op", "warning", node, "Ceil",
             "Ceil is not in TIDL 11.0's operator table; runs on Arm (ONNX Runtime), not an import failure",
             "each Arm node splits the TIDL subgraph; replace it with a TIDL-supported op for full offload", False)


# The one finding each violating fixture gives on AM68A (AM62A for the AM62A/AM67A-only 3x3 stride-3 conv).
EXPECTED: dict[str, F] = {
    'TIDL040_dropout': F('TIDL040', 'unsupported_op', 'warning', 'dropout', 'Dropout',
        'standalone Dropout is not a TIDL layer; runs on Arm (ONNX Runtime)',
        'tiexport fix removes the Dropout (a no-op at inference)', True),
    'TIDL040_identity': F('TIDL040', 'unsupported_op', 'warning', 'identity', 'Identity',
        'standalone Identity is not a TIDL layer; runs on Arm (ONNX Runtime)',
        'tiexport fix removes the Identity (a no-op at inference)', True),
    'TIDL040_standalone_erf': F('TIDL040', 'unsupported_op', 'warning', 'erf', 'Erf',
        'Erf outside a GELU pattern is not a TIDL layer; runs on Arm (ONNX Runtime)',
        'TIDL fuses Erf only in x * 0.5 * (1 + erf(x / sqrt(2))); export nn.GELU as such', False),
    'TIDL040_standalone_reducemean': F('TIDL040', 'unsupported_op', 'warning', 'reducemean', 'ReduceMean',
        'ReduceMean outside a LayerNorm pattern is not a TIDL layer; runs on Arm (ONNX Runtime)',
        'use GlobalAveragePool for a mean over H and W (x.mean((2, 3)) -> adaptive_avg_pool2d)', False),
    'TIDL040_unsupported_op': F('TIDL040', 'unsupported_op', 'warning', 'ceil', 'Ceil',
        "Ceil is not in TIDL 11.0's operator table; runs on Arm (ONNX Runtime), not an import failure",
        'each Arm node splits the TIDL subgraph; replace it with a TIDL-supported op for full offload', False),
    "TIDL050_conv_3x3_stride_3": C('TIDL050', 'conv', 'Conv',
        '3x3 stride-3 conv is unsupported on AM62A (TIDL 11.0)',
        'use stride 1 or 2 (e.g. a 3x3 stride-1 conv and a pooling)'),
    "TIDL050_conv_depthwise_kernel": C('TIDL050', 'conv', 'Conv',
        'depthwise 9x9 stride 1: TIDL 11.0 takes depthwise 3x3s1, 3x3s2, 5x5s1, 5x5s2, 7x7s1, 7x7s2',
        'use a 3x3/5x5/7x7 depthwise kernel at stride 1 or 2 (e.g. stack two 5x5 for a 9x9)'),
    "TIDL050_conv_pad_wider_than_input": C('TIDL050', 'conv', 'Conv',
        'padding 3 is larger than the input width 2',
        'pad at most the input width (or pad explicitly before the conv)'),
    "TIDL050_conv_unequal_strides": C('TIDL050', 'conv', 'Conv',
        'strides 1x2 differ for H and W; TIDL needs equal strides',
        'use the same stride along H and W'),
    "TIDL051_global_pool_plane": C('TIDL051', 'pool', 'GlobalAveragePool',
        'global average over a 33x33 plane (1089 > 1024 values)',
        'reshape to [N, C, H*W] and MatMul with a constant 1/(H*W) vector, or pool down first'),
    "TIDL051_pool_kernel": C('TIDL051', 'pool', 'MaxPool',
        "5x5 kernel at stride 1x1: TIDL's validated pooling is 1x1, 2x2 or 3x3 at stride 1 or 2",
        'cascade 3x3 poolings (two 3x3 stride-1 max pools equal one 5x5) or change the kernel'),
    "TIDL052_resize_half_pixel_floor": C('TIDL052', 'resize', 'Resize',
        "nearest with half_pixel and nearest_mode 'round_prefer_floor': TIDL needs round_prefer_ceil",
        'nearest: asymmetric + floor (nn.Upsample default); linear: pytorch_half_pixel (align_corners=False)'),
    "TIDL052_resize_linear_asymmetric": C('TIDL052', 'resize', 'Resize',
        "linear with coordinate_transformation_mode 'asymmetric' is unsupported",
        'nearest: asymmetric + floor (nn.Upsample default); linear: pytorch_half_pixel (align_corners=False)'),
    "TIDL052_resize_scale": C('TIDL052', 'resize', 'Resize',
        'scale 3 is not a power of 2; TIDL takes 2, 4, 8... only',
        'upsample by a power of 2 (e.g. 2x then a conv), or resize on Arm'),
    "TIDL053_concat_batch": C('TIDL053', 'concat', 'Concat',
        'concatenation along axis 0 of a rank-4 tensor; TIDL concatenates along axis -3, -2 or -1, not batch',
        'concatenate along channels, height or width'),
    "TIDL054_softmax_channel": C('TIDL054', 'softmax', 'Softmax',
        "softmax along axis 1 of a rank-4 tensor; TIDL 11.0's Softmax runs along H or W (the last two axes, not batch)",
        'move the softmax axis last (transpose) or use dim=-1'),
    "TIDL055_gemm_alpha": C('TIDL055', 'fc', 'Gemm',
        "alpha 0.5: TIDL's Gemm takes alpha 1 only",
        'fold alpha into the weight'),
    "TIDL055_gemm_bias_shape": C('TIDL055', 'fc', 'Gemm',
        'bias shape [1, 1]; TIDL takes a Gemm bias of shape [4] or [1, 4]',
        'reshape the bias to [4]'),
    "TIDL056_pad_channel": C('TIDL056', 'pad', 'Pad',
        'pads axis 1 of a rank-4 tensor; TIDL pads only H and W',
        'pad only the last two axes'),
    "TIDL056_pad_reflect": C('TIDL056', 'pad', 'Pad',
        "mode 'reflect': TIDL pads in constant mode only",
        'use constant (zero) padding'),
    "TIDL057_reshape_allowzero": C('TIDL057', 'reshape', 'Reshape',
        'allowzero 1 is unsupported by TIDL',
        'export the Reshape without allowzero'),
    "TIDL058_slice_step": C('TIDL058', 'slice', 'Slice',
        'step [2]: TIDL slices with step 1 except inside patch merging',
        'use a strided conv/pooling, or step 1'),
    "TIDL058_split_batch": C('TIDL058', 'split', 'Split',
        "input batch is 2; TIDL's Split takes batch 1 only",
        'run with batch 1 (or reshape so the batch is 1)'),
    "TIDL058_split_5d_attention": C('TIDL058', 'qkv_split', 'Split',
        "input has 5 dimensions (3x1x2x4x8); TIDL's Split takes at most 4, batch 1",
        'split before the permute: q, k, v = qkv(x).chunk(3, dim=-1), then reshape and permute each to '
        '[B, heads, N, dim] (4-D)'),
    "TIDL059_argmax_axis": C('TIDL059', 'argmax', 'ArgMax',
        "axis 0: TIDL's ArgMax runs along axis -3 (channels) only",
        'take the argmax over channels of an NCHW tensor (dim=1)'),
    "TIDL060_clip_min_positive": C('TIDL060', 'clip', 'Clip',
        "min 0.5 > 0: TIDL's Clip needs min <= 0 < max",
        'clip with min <= 0'),
    "TIDL061_cast_inside": C('TIDL061', 'cast', 'Cast',
        'Cast inside the network: TIDL takes Cast only at network inputs or outputs',
        'remove the cast (keep one float type inside the network)'),
    "TIDL062_convtranspose_kernel": C('TIDL062', 'deconv', 'ConvTranspose',
        '3x3 kernel at stride 1x1: TIDL 11.0 takes 4x4 or 2x2 at stride 2',
        'use kernel 2 or 4 with stride 2, or a nearest Resize x2 followed by a Conv'),
    "TIDL063_batchnorm_training": C('TIDL063', 'bn', 'BatchNormalization',
        'training_mode 1: TIDL takes inference BatchNormalization only',
        'export with model.eval() (training_mode 0)'),
    "TIDL064_add_batch_broadcast": C('TIDL064', 'add', 'Add',
        "input 'b_dq_DequantizeLinear_out' of shape [1, 4, 4, 4] is broadcast over the batch of 2; TIDL's Add "
        'does not broadcast over batch',
        'expand the input to the full batch, or run with batch 1'),
    "TIDL064_sub_const_shape": C('TIDL064', 'sub', 'Sub',
        'Sub constant of shape [4, 4]: TIDL takes a scalar or a 1-D constant along channels or width',
        'make the constant per-channel ([C, 1, 1]) or a scalar'),
    "TIDL064_sub_two_variable": C('TIDL064', 'sub', 'Sub',
        'Sub of two variable inputs is unsupported by TIDL 11.0',
        'compute a - b as a + (-1 * b), or Sub a constant'),
    "TIDL064_sum_three_inputs": C('TIDL064', 'sum', 'Sum',
        "3 inputs: TIDL's eltwise layers take exactly 2",
        'chain two-input operations'),
    "TIDL065_matmul_vector": C('TIDL065', 'matmul', 'MatMul',
        "B has rank 1; TIDL's MatMul needs B with at least 2 dims",
        'reshape B to [K, 1] and squeeze the result'),
    "TIDL066_layernorm_axis": C('TIDL066', 'layernorm', 'LayerNormalization',
        "normalizes from axis 1; TIDL's LayerNorm normalizes over the last axis only",
        'normalize over the last dimension only (nn.LayerNorm(last_dim))'),
    "TIDL067_reducemax_width": C('TIDL067', 'reducemax', 'ReduceMax',
        'reduces axes [3] of a rank-4 tensor; TIDL reduces along height (-2) only',
        'reduce along the height axis only'),
    "TIDL068_gather_scalar_index": dataclasses.replace(C('TIDL068', 'gather', 'Gather',
        'indices have rank 0; TIDL gathers with 1-D indices only',
        'tiexport fix writes it as a one-element Slice and a Squeeze'), fixable=True),
    "TIDL069_topk_axis": C('TIDL069', 'topk', 'TopK',
        "axis -1: TIDL's TopK runs along height (-2) only",
        'take the top-k along dim=-2'),
    "TIDL070_prelu_variable_slope": C('TIDL070', 'prelu', 'PRelu',
        "slope 'slope' is computed at run time; TIDL needs a constant slope",
        'use nn.PReLU (constant slope) or LeakyRelu'),
    "TIDL071_depthtospace_channels": C('TIDL071', 'd2s', 'DepthToSpace',
        '6 channels are not divisible by blocksize^2 = 4',
        'use a channel count divisible by blocksize^2'),
    "TIDL072_rank_limit": C('TIDL072', 'relu', 'Relu',
        "tensor 'input_dq_DequantizeLinear_out' of shape [2, 2, 2, 2, 2, 2, 2] has 7 non-singleton dims; TIDL's "
        'Relu takes at most 6',
        'reshape so the layer sees at most 6 non-singleton dims'),
    "TIDL073_gridsample_mode": C('TIDL073', 'grid_sample', 'GridSample',
        "mode 'bicubic': TIDL 11.0's GridSample takes nearest or bilinear",
        "use mode='bilinear'"),
    "TIDL074_scatter_axis": C('TIDL074', 'scatter', 'ScatterElements',
        "axis 2: TIDL's ScatterElements runs along width (the last axis) only",
        'scatter along the last axis'),
    "TIDL075_deformconv_kernel": C('TIDL075', 'deform_conv', 'DeformConv',
        '5x5 kernel at stride 1x1: TIDL takes DeformConv 3x3 stride 1 only',
        'use a 3x3 stride-1 deformable conv'),
}
DEVICE_OF = {"TIDL050_conv_3x3_stride_3": "AM62A"}
VIOLATING = sorted(k for k in OP_FIXTURES if k.startswith("TIDL"))
CLEAN = sorted(k for k in OP_FIXTURES if k.startswith("clean_"))
OP_RULE_IDS = sorted({"TIDL040", "TIDL041", *(r.id for r in OP_CONSTRAINT_RULES)})
SEVENTEEN_SUBGRAPHS = [
    *[_ceil(n) for n in sorted(["ceil", *(f"ceil_{i}" for i in range(1, 16))])],
    F("TIDL041", "subgraph_limit", "warning", "", "",
      "16 Ceil (TIDL040: Ceil is not in TIDL 11.0's operator table): these 16 node(s) left to Arm split the model "
      "into 17 TIDL subgraphs; TIDL offloads 16 (max_num_subgraphs) and delegates the rest to Arm",
      "make the Arm nodes TIDL-supported (see the TIDL040 and op_constraint findings) so subgraphs merge", False),
]


def _unsourced(findings: list[F]) -> list[F]:
    """The findings with their TI source checked (every op finding cites one) and then blanked for comparison."""
    for f in findings:
        assert f.source.startswith("TexasInstruments/") and not f.advice, f
    return [dataclasses.replace(f, source="") for f in findings]


def _findings(stem: str, device: str) -> list[F]:
    return _unsourced(tiexport.validate(OP_FIXTURES[stem](), device).devices[device].findings)


# ------------------------------------------------------------------------------------------------ fixtures
def test_every_op_rule_has_a_violating_and_a_clean_fixture() -> None:
    registered = {r.id for r in RULES if r.category in ("unsupported_op", "op_constraint", "subgraph_limit")}
    assert registered == set(OP_RULE_IDS)
    assert {k.split("_")[0] for k in VIOLATING} == set(OP_RULE_IDS)
    assert set(EXPECTED) | {"TIDL041_17_subgraphs"} == set(VIOLATING)
    # a clean counterpart per rule: the clean fixture of the same op family, named in CLEAN_OF
    assert set(CLEAN_OF) == set(OP_RULE_IDS) and set(CLEAN_OF.values()) <= set(CLEAN) | {"ceil_chain(15)"}


CLEAN_OF = {
    "TIDL040": "clean_gelu", "TIDL041": "ceil_chain(15)", "TIDL050": "clean_conv", "TIDL051": "clean_pool",
    "TIDL052": "clean_resize", "TIDL053": "clean_concat", "TIDL054": "clean_softmax", "TIDL055": "clean_gemm",
    "TIDL056": "clean_pad", "TIDL057": "clean_reshape", "TIDL058": "clean_slice", "TIDL059": "clean_argmax",
    "TIDL060": "clean_clip", "TIDL061": "clean_cast", "TIDL062": "clean_convtranspose", "TIDL063": "clean_batchnorm",
    "TIDL064": "clean_eltwise", "TIDL065": "clean_matmul", "TIDL066": "clean_layernorm", "TIDL067": "clean_reduce",
    "TIDL068": "clean_gather", "TIDL069": "clean_topk", "TIDL070": "clean_prelu", "TIDL071": "clean_depth_space",
    "TIDL072": "clean_rank", "TIDL073": "clean_gridsample", "TIDL074": "clean_scatter", "TIDL075": "clean_deformconv",
}


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_violating_fixture_gives_exactly_its_finding(stem: str) -> None:
    device = DEVICE_OF.get(stem, "AM68A")
    assert _findings(stem, device) == [EXPECTED[stem]]


@pytest.mark.parametrize("stem", [s for s in sorted(EXPECTED) if s not in DEVICE_OF])
def test_op_findings_are_the_same_on_every_accelerator_and_info_only_on_am62(stem: str) -> None:
    report = tiexport.validate(OP_FIXTURES[stem](), "all")
    assert {name: _unsourced(d.findings) for name, d in report.devices.items()} == {
        **{name: [EXPECTED[stem]] for name in ACCELERATED}, "AM62": [AM62_INFO]}


def test_3x3_stride_3_conv_is_flagged_on_am62a_and_am67a_only() -> None:
    report = tiexport.validate(OP_FIXTURES["TIDL050_conv_3x3_stride_3"](), "all")
    flagged = {name: [f.message for f in d.findings] for name, d in report.devices.items() if d.findings}
    assert flagged == {
        "AM62A": ["3x3 stride-3 conv is unsupported on AM62A (TIDL 11.0)" + ARM],
        "AM67A": ["3x3 stride-3 conv is unsupported on AM67A (TIDL 11.0)" + ARM],
        "AM62": [AM62_INFO.message],
    }


@pytest.mark.parametrize("stem", CLEAN)
def test_clean_fixture_has_no_findings_on_any_device(stem: str) -> None:
    report = tiexport.validate(OP_FIXTURES[stem](), "all")
    assert {name: _unsourced(d.findings) for name, d in report.devices.items()} == {
        **{name: [] for name in ACCELERATED}, "AM62": [AM62_INFO]}


def test_seventeen_subgraphs_is_a_warning_not_an_import_failure() -> None:
    assert _findings("TIDL041_17_subgraphs", "AM68A") == SEVENTEEN_SUBGRAPHS


def test_sixteen_subgraphs_is_within_the_limit() -> None:
    findings = _unsourced(tiexport.validate(ceil_chain(15), "AM68A").devices["AM68A"].findings)
    assert findings == [_ceil(n) for n in sorted(["ceil", *(f"ceil_{i}" for i in range(1, 15))])]


def test_subgraph_over_the_default_node_limit_is_info_from_11_0() -> None:
    """TI's 11.0 option table gives 864 as the default and says TIDL divides a larger subgraph evenly; earlier
    releases document no such option, so there is nothing to say for them."""
    model = relu_chain(288)  # 3 * 288 + 2 = 866 nodes in one subgraph
    assert _unsourced(tiexport.validate(model, "TDA4VM").devices["TDA4VM"].findings) == [
        F("TIDL041", "subgraph_limit", "info", "input_q_QuantizeLinear", "QuantizeLinear",
          "the TIDL subgraph starting here has 866 nodes, more than max_num_subgraph_nodes = 864: TIDL divides it "
          "evenly",
          "set advanced_options:max_num_subgraph_nodes to at least 866 to keep it whole", False),
    ]
    assert tiexport.validate(relu_chain(287), "TDA4VM").findings == []  # 863 nodes
    for sdk in ("9.2", "10.0", "10.1"):
        assert tiexport.validate(model, "TDA4VM", sdk=sdk).findings == [], sdk


def test_subgraph_limits_come_from_the_device_profile() -> None:
    tight = dataclasses.replace(get_device("AM68A"), name="TIGHT", max_num_subgraphs=2, max_num_subgraph_nodes=4)
    findings = tiexport.validate(ceil_chain(2), tight).devices["TIGHT"].findings
    assert [(f.rule_id, f.severity, f.node) for f in findings if f.rule_id == "TIDL041"] == [
        ("TIDL041", "warning", ""),
        ("TIDL041", "info", "ceil0_q_QuantizeLinear"),  # all three 5-node subgraphs, in report order
        ("TIDL041", "info", "ceil1_q_QuantizeLinear"),
        ("TIDL041", "info", "input_q_QuantizeLinear"),
    ]


@pytest.mark.parametrize("stem", sorted(OP_FIXTURES))
def test_node_support_agrees_with_the_findings(stem: str) -> None:
    device = get_device(DEVICE_OF.get(stem, "AM68A"))
    ctx = ModelContext(as_model(OP_FIXTURES[stem]()))
    arm = {ctx.node_name(n) for n in ctx.nodes if node_support(ctx, n, device)}
    flagged = {f.node for f in tiexport.validate(ctx.model, device).findings
               if f.category in ("unsupported_op", "op_constraint")}
    assert arm == flagged


_ORT_REJECTS = {"TIDL071_depthtospace_channels"}  # DepthToSpace channels not divisible: invalid for ONNX too
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64}


@pytest.mark.parametrize("stem", sorted(set(OP_FIXTURES) - _ORT_REJECTS))
def test_fixture_runs_in_onnx_runtime(stem: str) -> None:
    model = OP_FIXTURES[stem]()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.random(i.shape).astype(_NP[model.graph.input[k].type.tensor_type.elem_type])
             for k, i in enumerate(sess.get_inputs())}
    outs = sess.run(None, feeds)
    assert all(np.all(np.isfinite(o)) for o in outs)


def test_depth_to_space_fixture_is_rejected_by_onnx_runtime_too() -> None:
    with pytest.raises(Exception, match="multiple of"):
        sess = ort.InferenceSession(OP_FIXTURES["TIDL071_depthtospace_channels"]().SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        sess.run(None, {"input": np.zeros((1, 6, 4, 4), np.float32)})


# ------------------------------------------------------------------------------------------------ node_support
def _single(op: str, shape: list[int], *extra: object, opset: int = 17, n_out: int = 1, **attrs: object):
    """input -> Q/DQ -> op(x, *extra) -> outputs; ``extra``: numpy arrays become initializers, ("input", shape,
    elem_type) tuples graph inputs, "" an omitted input, "weight:<shape>" an int8 power-of-2 weight."""
    b = QdqBuilder(opset=opset, seed=0, name=op)
    x = b.qdq(b.input("input", shape), 2.0**-8, 0, "uint8", name="input")
    ins = [x]
    for e in extra:
        if isinstance(e, np.ndarray):
            ins.append(b.const(e, "c"))
        elif isinstance(e, tuple):
            ins.append(b.input(e[0], list(e[1]), e[2]))
        elif isinstance(e, str) and e.startswith("weight:"):
            ins.append(b.weight(shape=tuple(int(d) for d in e[7:].split("x")), per_channel=False, p2=True))
        else:
            ins.append(str(e))
    outs = b.node(op, ins, n_out=n_out, name="op", **attrs)
    for o in [outs] if n_out == 1 else outs:
        b.output(o)
    return b.build(ir_version=9 if opset > 18 else 8)


def _reasons(model, device: str = "AM68A", node: str = "op") -> list[str]:
    ctx = ModelContext(as_model(model))
    return node_support(ctx, next(n for n in ctx.nodes if n.name == node), get_device(device))


f32, i64 = np.float32, np.int64
S2 = np.array([1, 1, 2, 2], f32)
CASES = {
    "conv_stride4_needs_11x11": (
        lambda: _single("Conv", [1, 4, 8, 8], "weight:4x4x3x3", kernel_shape=[3, 3], strides=[4, 4], pads=[1] * 4),
        ["TIDL050: stride 4 with a 3x3 kernel: TIDL takes stride 4 only with 11x11"]),
    "conv_9x9_stride_2": (
        lambda: _single("Conv", [1, 4, 16, 16], "weight:4x4x9x9", kernel_shape=[9, 9], strides=[2, 2], pads=[4] * 4),
        ["TIDL050: 9x9 kernel with stride 2: kernels larger than 7 are unsupported at stride 2"]),
    "conv_runtime_weight": (
        lambda: _single("Conv", [1, 4, 8, 8], ("w", [4, 4, 3, 3], TensorProto.FLOAT), kernel_shape=[3, 3]),
        ["TIDL050: weight 'w' is computed at run time; TIDL's Conv takes one variable input"]),
    "maxpool_dilation": (
        lambda: _single("MaxPool", [1, 4, 8, 8], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2]),
        ["TIDL051: dilations [2, 2]: TIDL pools with dilation 1 only"]),
    "maxpool_storage_order": (
        lambda: _single("MaxPool", [1, 4, 8, 8], n_out=2, kernel_shape=[2, 2], strides=[2, 2], storage_order=1),
        ["TIDL051: storage_order 1 (column major): TIDL takes storage_order 0 only"]),
    "resize_cubic": (
        lambda: _single("Resize", [1, 4, 4, 4], "", S2, mode="cubic"),
        ["TIDL052: mode 'cubic': TIDL resizes with nearest or linear only"]),
    "resize_align_corners": (
        lambda: _single("Resize", [1, 4, 4, 4], "", S2, mode="linear", coordinate_transformation_mode="align_corners"),
        ["TIDL052: coordinate_transformation_mode 'align_corners': TIDL takes half_pixel, pytorch_half_pixel or "
         "asymmetric"]),
    "resize_unequal_scales": (
        lambda: _single("Resize", [1, 4, 4, 4], "", np.array([1, 1, 2, 1], f32), mode="linear"),
        ["TIDL052: scales 2x1 differ for H and W; TIDL needs equal H/W scales"]),
    "resize_downsample": (
        lambda: _single("Resize", [1, 4, 4, 4], "", np.array([1, 1, 0.5, 0.5], f32), mode="linear"),
        ["TIDL052: scale 0.5 < 1 (downsampling); TIDL's Resize only upsamples"]),
    "resize_channels": (
        lambda: _single("Resize", [1, 4, 4, 4], "", np.array([1, 2, 2, 2], f32), mode="linear"),
        ["TIDL052: resizes axis 1 (scale 2); TIDL resizes only H and W"]),
    "resize_sizes_scale_3": (
        lambda: _single("Resize", [1, 4, 4, 4], "", "", np.array([1, 4, 12, 12], i64), mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        ["TIDL052: scale 3 is not a power of 2; TIDL takes 2, 4, 8... only"]),
    "resize_asymmetric_round": (
        lambda: _single("Resize", [1, 4, 4, 4], "", S2, mode="nearest", coordinate_transformation_mode="asymmetric"),
        ["TIDL052: nearest with asymmetric and nearest_mode 'round_prefer_floor': TIDL needs floor"]),
    "resize_antialias_exclude_outside": (
        lambda: _single("Resize", [1, 4, 4, 4], "", S2, opset=18, mode="linear", antialias=1, exclude_outside=1,
                        coordinate_transformation_mode="pytorch_half_pixel"),
        ["TIDL052: antialias 1: TIDL resizes without antialiasing",
         "TIDL052: exclude_outside 1: TIDL takes exclude_outside 0 only"]),
    "resize_keep_aspect_ratio": (
        lambda: _single("Resize", [1, 4, 4, 4], "", "", np.array([8, 8], i64), opset=18, mode="nearest", axes=[2, 3],
                        keep_aspect_ratio_policy="not_larger", coordinate_transformation_mode="asymmetric",
                        nearest_mode="floor"),
        ["TIDL052: keep_aspect_ratio_policy 'not_larger': TIDL takes 'stretch' only"]),
    "softmax_opset11_default_axis": (
        lambda: _single("Softmax", [1, 4, 4, 4], opset=11),
        ["TIDL054: softmax along axis 1 of a rank-4 tensor; TIDL 11.0's Softmax runs along H or W (the last two axes, "
         "not batch)"]),
    "gemm_transA": (
        lambda: _single("Gemm", [8, 1], "weight:8x4", transA=1),
        ["TIDL055: transA 1: TIDL's Gemm takes transA 0 only"]),
    "pad_axes_channel": (
        lambda: _single("Pad", [1, 4, 4, 4], np.array([1, 1], i64), "", np.array([1], i64), opset=18),
        ["TIDL056: pads axis 1 of a rank-4 tensor; TIDL pads only H and W"]),
    "pad_axes_hw": (
        lambda: _single("Pad", [1, 4, 4, 4], np.array([1, 1, 1, 1], i64), "", np.array([-2, -1], i64), opset=18),
        []),
    "slice_runtime_starts": (
        lambda: _single("Slice", [1, 4, 4, 4], ("starts", [1], TensorProto.INT64), np.array([2], i64),
                        np.array([1], i64)),
        ["TIDL058: starts 'starts' is computed at run time; TIDL needs constant 1-D starts"]),
    "argmax_keepdims_last_index": (
        lambda: _single("ArgMax", [1, 4, 4, 4], axis=1, keepdims=0, select_last_index=1),
        ["TIDL059: keepdims 0: TIDL's ArgMax takes keepdims 1 only",
         "TIDL059: select_last_index 1 is unsupported by TIDL"]),
    "clip_max_not_positive": (
        lambda: _single("Clip", [1, 4, 4, 4], np.array(-1.0, f32), np.array(0.0, f32)),
        ["TIDL060: max 0 <= 0: TIDL's Clip needs min <= 0 < max"]),
    "convtranspose_group": (
        lambda: _single("ConvTranspose", [1, 4, 4, 4], "weight:4x2x2x2", group=2, kernel_shape=[2, 2],
                        strides=[2, 2]),
        ["TIDL062: group 2: TIDL's ConvTranspose takes group 1 only"]),
    "convtranspose_3x3_s2": (
        lambda: _single("ConvTranspose", [1, 4, 4, 4], "weight:4x4x3x3", kernel_shape=[3, 3], strides=[2, 2]),
        ["TIDL062: 3x3 kernel at stride 2x2: TIDL 11.0 takes 4x4 or 2x2 at stride 2"]),
    "mul_batch_broadcast": (
        lambda: _single("Mul", [2, 4, 4, 4], ("other", [1, 4, 4, 4], TensorProto.FLOAT)),
        ["TIDL064: input 'other' of shape [1, 4, 4, 4] is broadcast over the batch of 2; TIDL's Mul does not "
         "broadcast over batch"]),
    "sub_const_per_channel": (lambda: _single("Sub", [1, 4, 4, 4], np.ones((1, 4, 1, 1), f32)), []),
    "sub_const_along_height": (
        lambda: _single("Sub", [1, 4, 4, 4], np.ones((4, 1), f32)),
        ["TIDL064: Sub constant of shape [4, 1]: TIDL takes a scalar or a 1-D constant along channels or width"]),
    "layernorm_scale_1xN": (
        lambda: _single("LayerNormalization", [1, 4, 8], np.ones((1, 8), f32), np.zeros((1, 8), f32)), []),
    "layernorm_scale_other": (
        lambda: _single("LayerNormalization", [1, 4, 8], np.ones((1, 1, 8), f32)),
        ["TIDL066: scale shape [1, 1, 8]; TIDL takes [8] or [1, 8]"]),
    "reducemax_keepdims_0": (
        lambda: _single("ReduceMax", [1, 4, 4, 4], axes=[2], keepdims=0),
        ["TIDL067: keepdims 0: TIDL reduces with keepdims 1 only"]),
    "reducemin_axes_input_opset18": (
        lambda: _single("ReduceMin", [1, 4, 4, 4], np.array([3], i64), opset=18),
        ["TIDL067: reduces axes [3] of a rank-4 tensor; TIDL reduces along height (-2) only"]),
    "reducemax_all_axes": (
        lambda: _single("ReduceMax", [1, 4, 4, 4]),
        ["TIDL067: reduces axes [0, 1, 2, 3] of a rank-4 tensor; TIDL reduces along height (-2) only"]),
    "gather_from_1d": (
        lambda: _single("Gather", [8], np.array([0, 1], i64)),
        ["TIDL068: gathers from a 1-D tensor; TIDL needs input rank > 1"]),
    "topk_unsorted_runtime_k": (
        lambda: _single("TopK", [1, 4, 4, 4], ("k", [1], TensorProto.INT64), n_out=2, axis=-2, sorted=0),
        ["TIDL069: sorted 0: TIDL's TopK returns sorted results only",
         "TIDL069: K 'k' is computed at run time; TIDL needs K as an initializer"]),
    "space_to_depth_indivisible": (
        lambda: _single("SpaceToDepth", [1, 4, 5, 4], blocksize=2),
        ["TIDL071: H x W = 5x4 not divisible by blocksize 2"]),
    "gridsample_border": (
        lambda: _single("GridSample", [1, 4, 4, 4], np.zeros((1, 4, 4, 2), f32), padding_mode="border"),
        ["TIDL073: padding_mode 'border': TIDL takes 'zeros' only"]),
    "scatternd_mul_nonzero_data": (
        lambda: _single("ScatterND", [1, 4], np.array([[0, 1]], i64), ("updates", [1], TensorProto.FLOAT),
                        reduction="mul"),
        ["TIDL074: reduction 'mul' is unsupported by TIDL's ScatterND",
         "TIDL074: data is not a zero constant; TIDL scatters into a zero constant only"]),
    "deformconv_stride_2": (
        lambda: _single("DeformConv", [1, 4, 8, 8], "weight:4x4x3x3", np.zeros((1, 18, 4, 4), f32), opset=19,
                        kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
        ["TIDL075: 3x3 kernel at stride 2x2: TIDL takes DeformConv 3x3 stride 1 only"]),
    "matmul_rank5": (
        lambda: _single("MatMul", [2, 2, 2, 4, 8], "weight:8x4"),
        ["TIDL072: tensor 'input_dq_DequantizeLinear_out' of shape [2, 2, 2, 4, 8] has 5 non-singleton dims; "
         "TIDL's MatMul takes at most 4"]),
    "unsqueeze_rank7": (
        lambda: _single("Unsqueeze", [1, 2, 2, 2, 2, 2], np.array([0], i64)),
        ["TIDL072: output has 7 dims; TIDL's Unsqueeze outputs at most 6"]),
    "custom_domain": (
        lambda: _single("Gelu", [1, 4, 4, 4], domain="com.microsoft"),
        ["TIDL040: com.microsoft.Gelu is not a TIDL operator; runs on Arm (ONNX Runtime), not an import failure"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_node_support_reasons(case: str) -> None:
    build, expected = CASES[case]
    assert _reasons(build()) == expected


def test_reshape_with_a_shape_computed_at_run_time_is_not_offloaded() -> None:
    b = QdqBuilder(seed=0)
    x = b.qdq(b.input("input", [1, 4, 4, 4]), 2.0**-8, 0, "uint8", name="input")
    y = b.node("Reshape", [x, b.node("Shape", [x], name="shape")], name="op")
    b.output(y)
    model = b.build()
    assert _reasons(model) == ["TIDL057: target shape 'shape_out' is computed at run time; TIDL needs a constant shape"]
    assert _reasons(model, node="shape") == [
        "TIDL040: Shape is not in TIDL 11.0's operator table; runs on Arm (ONNX Runtime), not an import failure"]


def test_no_accelerator_means_no_node_is_offloaded() -> None:
    model = OP_FIXTURES["clean_conv"]()
    ctx = ModelContext(as_model(model))
    am62 = get_device("AM62")
    assert {tuple(node_support(ctx, n, am62)) for n in ctx.nodes} == {("TIDL040: AM62 has no TIDL accelerator",)}
    assert partition(ctx, am62).subgraphs == ()


def test_erf_inside_gelu_is_offloaded_without_qdq_between_steps() -> None:
    b = QdqBuilder(seed=0)
    x = b.qdq(b.input("input", [1, 4, 8]), 2.0**-6, 0, "int8", name="input")
    half = b.node("Mul", [x, b.const(np.float32(0.5), "half")], name="half")
    e = b.node("Erf", [b.node("Mul", [x, b.const(np.float32(0.7071), "inv_sqrt2")], name="scale")], name="op")
    y = b.node("Mul", [half, b.node("Add", [e, b.const(np.float32(1.0), "one")], name="add")], name="mul")
    b.output(b.qdq(y, 2.0**-5, 0, "int8", name="gelu"))
    assert _reasons(b.build()) == []


def test_sub_of_two_variables_inside_layernorm_pattern_is_offloaded() -> None:
    model = OP_FIXTURES["clean_layernorm_pattern"]()
    assert [_reasons(model, node=n) for n in ("mean", "sub", "var")] == [[], [], []]


def test_mean_subtraction_without_variance_is_not_a_layernorm() -> None:
    b = QdqBuilder(seed=0)
    x = b.qdq(b.input("input", [1, 4, 8]), 2.0**-8, 0, "uint8", name="input")
    mean = b.qdq(b.node("ReduceMean", [x], name="mean", axes=[-1], keepdims=1), 2.0**-8, 0, "uint8", name="mean")
    b.output(b.qdq(b.node("Sub", [x, mean], name="op"), 2.0**-7, 0, "int8", name="sub"))
    model = b.build()
    assert _reasons(model) == ["TIDL064: Sub of two variable inputs is unsupported by TIDL 11.0"]
    assert _reasons(model, node="mean") == [
        "TIDL040: ReduceMean outside a LayerNorm pattern is not a TIDL layer; runs on Arm (ONNX Runtime)"]


# ------------------------------------------------------------------------------------------------ partition
def test_partition_splits_around_arm_nodes() -> None:
    ctx = ModelContext(as_model(ceil_chain(2)))
    part = partition(ctx, get_device("AM68A"))
    assert [[n.name for n in sub] for sub in part.subgraphs] == [
        ["input_q_QuantizeLinear", "input_dq_DequantizeLinear", "relu", "relu0_q_QuantizeLinear",
         "relu0_dq_DequantizeLinear"],
        ["ceil0_q_QuantizeLinear", "ceil0_dq_DequantizeLinear", "relu_1", "relu1_q_QuantizeLinear",
         "relu1_dq_DequantizeLinear"],
        ["ceil1_q_QuantizeLinear", "ceil1_dq_DequantizeLinear", "relu_2", "relu_last_q_QuantizeLinear",
         "relu_last_dq_DequantizeLinear"],
    ]
    assert [n.name for n in part.arm] == ["ceil", "ceil_1"]
    assert part.reasons == {n: [_ceil(n).rule_id + ": " + _ceil(n).message] for n in ("ceil", "ceil_1")}


def test_partition_does_not_count_weights_or_lone_qdq_as_subgraphs() -> None:
    # input Q/DQ -> MatMul (on Arm: B is 1-D) -> Q/DQ: what is left on TIDL holds no layer
    ctx = ModelContext(as_model(OP_FIXTURES["TIDL065_matmul_vector"]()))
    part = partition(ctx, get_device("AM68A"))
    assert part.subgraphs == ()
    assert [n.name for n in part.arm] == ["matmul"]


def test_partition_of_a_clean_model_is_one_subgraph_of_every_node() -> None:
    ctx = ModelContext(as_model(OP_FIXTURES["clean_conv"]()))
    part = partition(ctx, get_device("TDA4VM"))
    assert [len(s) for s in part.subgraphs] == [len(ctx.nodes)] and part.arm == ()

