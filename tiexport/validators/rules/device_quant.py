"""Per-device quantization rules: power-of-2 scales, symmetric zero points, per-channel weights, the network input,
and MatMul signedness.

What TI's sources say, and how the rules weigh it:

- TDA4VM (MMAv1, J721E / AM68PA) does not support asymmetric or per-channel quantization (edgeai-tidl-tools
  ``docs/tidl_fsg_quantization.md`` line 48 and the device feature table of ``docs/supported_ops_rts_versions.md``,
  rel_09_02 .. rel_11_00) and quantizes with power-of-2 scales (edgeai-tensorlab torchmodelopt's quantization README;
  edgeai-benchmark's TDA4VM preset sets ``quantization_scale_type: 1`` after a config's own options). Yet TI's model
  zoo deploys the per-channel, affine, non-power-of-2 QAT v2 model ``cl-6508`` on TDA4VM (TDA4VM/8bits artifacts at
  r9.2, r10.0, r11.0, r11.1, r11.2): TIDL imports such models and brings them to its own grid, so its outputs differ
  from the model's. These findings are therefore warnings (fixable: ``tiexport fix --device TDA4VM`` makes the
  conversion in ONNX, where parity can measure it), not errors.
- Weights are symmetric on every layer, per-tensor for ConvTranspose/DeformConv/BatchNorm/PRelu, and the network
  input symmetric per-tensor; layers other than Conv/InnerProduct/Concat/Softmax/LayerNorm/Add take symmetric
  activations (TIDL's per-layer quantization table, the 11.2-era ``docs/quantization.md``).
- uint8 with zero point 128 is int8 with zero point 0 on the same grid; uint8 with zero point 127 is what TI's own
  symmetric types (WT8SYMP2_AT8SYMP2, WC8SYMP2_AT8SYMP2) export: PyTorch's midpoint of a customized range, which TI's
  power-of-2 helper accepts as symmetric (torchmodelopt v2 ``observer_utils.py``). Both are info findings.
- MatMul sign combinations come from the MatMul row of each release's operator table.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from tiexport.context import ModelContext, QParams
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import PASS_THROUGH, PER_TENSOR_WEIGHT_OPS, SYMMETRIC_INPUT_OPS, get_spec, is_power_of_two
from tiexport.tidl_spec.sources import (
    BENCHMARK_PRESETS,
    DEVICE_FEATURES,
    LAYER_QUANT_TABLE,
    MODELZOO_TDA4VM_QAT_V2,
    QUANT_ASYMMETRIC,
    TDA4VM_P2_TORCHMODELOPT,
    TENSORLAB_REPO,
    DocRef,
)
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.qdq import pattern_members

__all__ = [
    "InputQuantizationRule",
    "MatMulSignRule",
    "PerChannelRule",
    "PowerOfTwoRule",
    "SymmetricRule",
]

TI_SYMMETRIC_ZP = DocRef(
    TENSORLAB_REPO, "r11.0",
    "edgeai-modeloptimization/torchmodelopt/edgeai_torchmodelopt/xmodelopt/quantization/v2/observer_utils.py", 67,
).cite()
_IMPORTED_ANYWAY = ("TI's model zoo deploys such a model on TDA4VM (cl-6508, per-channel affine QAT v2): TIDL "
                    "imports it on its own grid, so TIDL's outputs differ from this model's")


def _convention(qp: QParams) -> str:
    """'' for a plain asymmetric zero point; else why the grid is TI's symmetric one after all."""
    zps = {int(z) for z in qp.zero_points.ravel()}
    if qp.qtype == TensorProto.UINT8 and zps == {128}:
        return "uint8 with zero point 128 is exactly int8 with zero point 0"
    if qp.qtype == TensorProto.UINT8 and zps == {127}:
        return ("uint8 with zero point 127 is TI's symmetric convention (its WT8SYMP2_AT8SYMP2 / WC8SYMP2_AT8SYMP2 "
                "exports); int8 with zero point 0 is the same grid shifted one step")
    return ""


def _is_weight(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    if node.op_type == "DequantizeLinear":
        return ctx.is_weight_dq(node)
    return bool(node.input) and ctx.is_const(node.input[0])



class PowerOfTwoRule(Rule):
    """TIDL020: a Q/DQ scale is not an exact power of two on a device that quantizes with power-of-2 scales.

    Why: TDA4VM (MMAv1) "uses per-tensor, power-of-2-scale quantization" (torchmodelopt's quantization README) and
    edgeai-benchmark compiles every model for it with ``quantization_scale_type: 1`` (its TDA4VM preset). A warning,
    not an error: TI's model zoo deploys the non-power-of-2 QAT v2 model cl-6508 on TDA4VM, so the import works and
    brings the scales to powers of two itself. Fix: ``tiexport fix --device TDA4VM`` rounds scales up to
    ``2**ceil(log2(s))`` (ranges only grow, as TI's wrapper does) and requantizes weights and biases, so parity
    shows what the device will compute; better, train with ``WT8SYMP2_AT8SYMP2``.
    """

    id = "TIDL020"
    title = "scale is not a power of two"
    category = "power_of_two"
    severity = "warning"
    sources = (TDA4VM_P2_TORCHMODELOPT, BENCHMARK_PRESETS, MODELZOO_TDA4VM_QAT_V2)

    def applies_to(self, device: DeviceProfile) -> bool:
        return device.power_of_two_scales

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node, qp in ctx.quantizers():
            if qp.scale.size == 0:
                continue
            ok = is_power_of_two(qp.scale)
            finite = np.isfinite(np.asarray(qp.scale, dtype=np.float64)) & (np.asarray(qp.scale) > 0)
            if np.all(ok) or not np.all(finite):
                continue  # invalid scales are TIDL011's, and no rounding can fix them
            bad = np.asarray(qp.scale, dtype=np.float64).ravel()[~ok.ravel()]
            shown = ", ".join(f"{v:.6g}" for v in bad[:3]) + (", ..." if bad.size > 3 else "")
            yield self.finding(
                ctx, node, f"{bad.size} of {qp.scale.size} scale(s) not a power of two ({shown}); {device.name} "
                "quantizes with power-of-2 scales, so TIDL changes these at import",
                f"tiexport fix --device {device.name} (rounds up to 2**ceil(log2(s))), or train with WT8SYMP2_AT8SYMP2",
                fixable=True,
            )


class SymmetricRule(Rule):
    """TIDL021: a zero point is not 0 where the device or the layer quantizes symmetric.

    Why: weights are symmetric on every TIDL layer (TIDL's per-layer quantization table): an error. TDA4VM does not
    support asymmetric quantization (``tidl_fsg_quantization.md`` line 48, the device feature table): a warning, since
    TI deploys an affine QAT v2 model there (see the module docstring). On MMAv2 devices, pooling, Relu, Resize,
    Sigmoid/Tanh, Gather, ArgMax, DepthToSpace, the eltwise ops other than Add, ConvTranspose, BatchNorm, PRelu,
    Split/Slice/Pad/Squeeze, Reduce, TopK, GridSample and ScatterElements take symmetric activations (the same
    table): info where an asymmetric activation feeds one, since TI's own default MSA_WC8_AT8 exports do so and the
    table is 11.2-era. uint8 zero point 128 (exactly int8 zero point 0) and TI's uint8 zero point 127 are info
    (module docstring).
    Fix: ``tiexport fix --device NAME``; in PyTorch use a SYMP2 qconfig type for TDA4VM.
    """

    id = "TIDL021"
    title = "asymmetric zero point where symmetric is required"
    category = "symmetric"
    sources = (LAYER_QUANT_TABLE, QUANT_ASYMMETRIC, DEVICE_FEATURES, MODELZOO_TDA4VM_QAT_V2, TI_SYMMETRIC_ZP)

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node, qp in ctx.quantizers():
            if qp.symmetric:
                continue
            zps = sorted({int(z) for z in qp.zero_points.ravel()})  # np.unique would import numpy.ma (~15 ms)
            shown = ", ".join(str(z) for z in zps[:3]) + (", ..." if len(zps) > 3 else "")
            convention = _convention(qp)
            if _is_weight(ctx, node):
                yield self.finding(
                    ctx, node, f"weight zero point {shown}: TIDL weights are symmetric (zero point 0)",
                    "tiexport fix requantizes the weight symmetric; in PyTorch use a symmetric weight observer",
                    fixable=True, source=LAYER_QUANT_TABLE,
                )
            elif not device.asymmetric_activations:
                if convention:
                    yield self.finding(
                        ctx, node, f"activation zero point {shown}: {convention}",
                        f"tiexport fix --device {device.name} writes int8 zero point 0 (at most one step at the top "
                        "of the range)", severity="info", fixable=True, source=TI_SYMMETRIC_ZP)
                else:
                    yield self.finding(
                        ctx, node, f"activation zero point {shown}: {device.name} does not support asymmetric "
                        f"quantization; {_IMPORTED_ANYWAY}",
                        f"tiexport fix --device {device.name}; in PyTorch use WT8SYMP2_AT8SYMP2",
                        severity="warning", fixable=True, source=QUANT_ASYMMETRIC,
                    )
            elif node.op_type == "DequantizeLinear" and not convention:
                fused = pattern_members(ctx)  # Div/Mul inside a GELU/LayerNorm are one TIDL layer, not eltwise
                users = sorted({c.op_type for c in _effective_consumers(ctx, node.output[0])
                                if c.op_type in SYMMETRIC_INPUT_OPS and ctx.producer.get(c.output[0]) not in fused})
                if users:
                    yield self.finding(
                        ctx, node,
                        f"asymmetric activation (zero point {shown}) feeds {', '.join(users)}, whose activations "
                        "TIDL's per-layer table lists as symmetric: TIDL's numerics there may differ from this "
                        "model's (TI's own MSA_WC8_AT8 exports do this too)",
                        "nothing to do for the import; for closer parity quantize this tensor symmetric in PyTorch",
                        severity="info", source=LAYER_QUANT_TABLE,
                    )


def _effective_consumers(ctx: ModelContext, tensor: str, depth: int = 0) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []
    for c in ctx.consumers_of(tensor):
        if c.op_type in ("Reshape", "Transpose", "Flatten", "Unsqueeze") and depth < 8 and c.output:
            out.extend(_effective_consumers(ctx, c.output[0], depth + 1))
        else:
            out.append(c)
    return out


class PerChannelRule(Rule):
    """TIDL022: weights are quantized per channel where TIDL quantizes per-tensor.

    Why: TDA4VM does not support per-channel quantization (the device feature table: "Support for Asymmetric, Per
    Channel Quantization" is not available on AM68PA/TDA4VM): a warning, since TI deploys the per-channel QAT v2 model
    cl-6508 on TDA4VM (module docstring). ConvTranspose, DeformConv, BatchNormalization and PRelu take per-tensor
    weights on every device (TIDL's per-layer quantization table): an error. Fix: ``tiexport fix --device NAME``
    requantizes those weights per-tensor (max of the channel ranges); in PyTorch use ``WT8SYMP2_AT8SYMP2`` for TDA4VM.
    """

    id = "TIDL022"
    title = "per-channel weights where per-tensor is required"
    category = "per_channel"
    sources = (DEVICE_FEATURES, MODELZOO_TDA4VM_QAT_V2, LAYER_QUANT_TABLE)

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node in ctx.nodes:
            if node.op_type != "DequantizeLinear" or not ctx.is_weight_dq(node):
                continue
            qp = ctx.qparams(node)
            if qp is None or not qp.per_channel or qp.qtype == TensorProto.INT32:
                continue
            consumers = {c.op_type for c in ctx.consumers_of(node.output[0])}
            if consumers & PER_TENSOR_WEIGHT_OPS:
                ops = ", ".join(sorted(consumers & PER_TENSOR_WEIGHT_OPS))
                yield self.finding(ctx, node, f"per-channel weight of {ops}, which TIDL takes per-tensor only",
                                   f"tiexport fix --device {device.name}", fixable=True, source=LAYER_QUANT_TABLE)
            elif not device.per_channel_weights:
                yield self.finding(
                    ctx, node, f"per-channel weight ({qp.scale.size} scales): {device.name} does not support "
                    f"per-channel quantization; {_IMPORTED_ANYWAY}",
                    f"tiexport fix --device {device.name}, or train with WT8SYMP2_AT8SYMP2", severity="warning",
                    fixable=True, source=device.spec.features_source,
                )


class InputQuantizationRule(Rule):
    """TIDL023: the network input is quantized per channel or asymmetric.

    Why: "The input to the network should be quantized in Symmetric, Per-tensor fashion as the input data convert
    layer only supports symmetric quantization" (the notes of TIDL's per-layer quantization table). Per-channel: an
    error. Asymmetric: a warning (what TIDL's data-convert layer then does is not documented; uint8 zero point 128,
    exactly int8 zero point 0, and TI's uint8 zero point 127 are info). Fix: ``tiexport fix`` rewrites the input
    QuantizeLinear to zero point 0 (int8, or uint8 for non-negative input ranges); in PyTorch quantize the input
    symmetric.
    """

    id = "TIDL023"
    title = "network input not quantized symmetric per-tensor"
    category = "input_quantization"
    sources = (LAYER_QUANT_TABLE,)

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for vi in ctx.graph_inputs:
            for q in ctx.input_quantizers(vi.name, PASS_THROUGH | {"Cast"}):
                qp = ctx.qparams(q)
                if qp is None:
                    continue
                if qp.per_channel:
                    yield self.finding(ctx, q, f"input {vi.name!r} quantized per channel",
                                       "quantize the network input per-tensor")
                elif not qp.symmetric:
                    convention = _convention(qp)
                    zp = int(qp.zero_points.ravel()[0])
                    # TI's zero point 127 stays where the device takes asymmetric activations (fix leaves it)
                    kept = zp == 127 and device.asymmetric_activations
                    yield self.finding(
                        ctx, q, f"input {vi.name!r} quantized with zero point {zp}; "
                        + (convention if convention else "TIDL's input data-convert layer is symmetric only"),
                        "nothing to do (tiexport fix leaves TI's convention as it is)" if kept
                        else f"tiexport fix --device {device.name}", severity="info" if convention else "warning",
                        fixable=not kept,
                    )


class MatMulSignRule(Rule):
    """TIDL024: a MatMul mixes signed and unsigned operands in a way TIDL does not take.

    Why: the MatMul row of the operator table: "MatMul with (both) signed inputs & unsigned output is not supported"
    (10.0 on), and "MatMul with signed & unsigned input combination is not supported in TDA4VM" (10.1 on; 9.2: "for
    TDA4VM variable input case, doesn't support unsigned input"). Like every operator-table constraint, the node is
    then delegated to Arm: a warning. TI's wrapper makes MatMul inputs symmetric (int8) unless they come from
    Softmax/Relu/Sigmoid. Fix: quantize both MatMul inputs int8 (or both uint8 when non-negative), and the output int8
    when an input is signed.
    """

    id = "TIDL024"
    title = "MatMul operand signedness unsupported"
    category = "matmul_sign"
    severity = "warning"
    sources = (get_spec().op_source("MatMul"),)

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        spec = device.spec
        src = spec.op_source("MatMul")
        for node in ctx.nodes_of("MatMul"):
            if len(node.input) < 2 or not node.output:
                continue  # malformed: onnx.checker reports it (TIDL001)
            in_q: list[QParams | None] = []
            for inp in node.input[:2]:
                dq = ctx.dq_of(inp)
                in_q.append(ctx.qparams(dq) if dq is not None else None)
            if any(q is None for q in in_q):
                continue
            signs = [q.signed for q in in_q if q is not None]
            out_q = None
            for c in ctx.consumers_of(node.output[0]):
                if c.op_type == "QuantizeLinear":
                    out_q = ctx.qparams(c)
                    break
            if spec.sdk != "9.2" and all(signs) and out_q is not None and not out_q.signed:
                yield self.finding(ctx, node, "signed inputs with an unsigned (uint8) output; runs on Arm",
                                   "quantize the MatMul output as int8", source=src)
            # Mixed signs matter for two variable operands; a constant B is an InnerProduct weight (always int8).
            b_dq = ctx.dq_of(node.input[1])
            if b_dq is not None and ctx.is_weight_dq(b_dq):
                continue
            if device.mma_version == 1 and spec.matmul_mixed_sign_tda4vm_unsupported and len(set(signs)) > 1:
                yield self.finding(ctx, node, f"one signed and one unsigned input; {device.name} takes both the "
                                   "same; runs on Arm", "quantize both MatMul inputs int8 (symmetric)", source=src)
            elif device.mma_version == 1 and spec.sdk == "9.2" and not all(signs):
                yield self.finding(ctx, node, f"unsigned variable input; TIDL {spec.sdk} on {device.name} takes "
                                   "signed MatMul inputs only; runs on Arm", "quantize both MatMul inputs int8",
                                   source=src)
