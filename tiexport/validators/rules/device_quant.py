"""Per-device quantization rules: power-of-2 scales, symmetric zero points, per-channel weights, the network input,
and MatMul signedness (tidl.md §1 device table and §2 per-layer table)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from tiexport.context import ModelContext, QParams
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import is_power_of_two
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


def _is_weight(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    if node.op_type == "DequantizeLinear":
        return ctx.is_weight_dq(node)
    return bool(node.input) and ctx.is_const(node.input[0])



class PowerOfTwoRule(Rule):
    """TIDL020: a Q/DQ scale is not an exact power of two on a device that requires it.

    Why: TDA4VM (MMAv1) takes power-of-2 scales only (tidl.md §1; ``quantization_scale_type: 1``). Fix:
    ``tiexport fix --device TDA4VM`` rounds scales up to ``2**ceil(log2(s))`` (ranges only grow, as TI's wrapper
    does, tidl.md §2) and requantizes weights and biases; better, train with ``WT8SYMP2_AT8SYMP2``.
    """

    id = "TIDL020"
    title = "scale is not a power of two"
    category = "power_of_two"

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
                ctx, node, f"{bad.size} of {qp.scale.size} scale(s) not a power of two ({shown}); "
                f"{device.name} needs power-of-2 scales",
                f"tiexport fix --device {device.name} (rounds up to 2**ceil(log2(s))), or train with WT8SYMP2_AT8SYMP2",
                fixable=True,
            )


class SymmetricRule(Rule):
    """TIDL021: a zero point is not 0 where the device or the layer needs symmetric quantization.

    Why: weights are symmetric on every TIDL device (tidl.md §2 table, weights column); TDA4VM takes symmetric
    activations only (tidl.md §1); on MMAv2 devices pooling, Relu, Resize, Sigmoid/Tanh, Gather, ArgMax,
    DepthToSpace, eltwise other than Add, ConvTranspose, BatchNormalization, PRelu, Split/Slice/Pad/Squeeze treat
    their activations as symmetric (tidl.md §2 table). uint8 with zero point 128 is the same grid as int8 with zero
    point 0 (tidl.md §2 last bullet) and is rewritten exactly by ``tiexport fix``.
    Fix: ``tiexport fix --device NAME``; in PyTorch use a SYMP2 qconfig type for TDA4VM.
    """

    id = "TIDL021"
    title = "asymmetric zero point where symmetric is required"
    category = "symmetric"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node, qp in ctx.quantizers():
            if qp.symmetric:
                continue
            zps = sorted({int(z) for z in qp.zero_points.ravel()})  # np.unique would import numpy.ma (~15 ms)
            shown = ", ".join(str(z) for z in zps[:3]) + (", ..." if len(zps) > 3 else "")
            if _is_weight(ctx, node):
                yield self.finding(
                    ctx, node, f"weight zero point {shown}: TIDL weights are symmetric (zero point 0)",
                    "tiexport fix requantizes the weight symmetric; in PyTorch use a symmetric weight observer",
                    fixable=True,
                )
            elif not device.asymmetric_activations:
                exact = " (uint8 with zero point 128 is exactly int8 with zero point 0)" if qp.uint8_midpoint else ""
                yield self.finding(
                    ctx, node, f"activation zero point {shown}: {device.name} takes symmetric activations only{exact}",
                    f"tiexport fix --device {device.name}; in PyTorch use WT8SYMP2_AT8SYMP2",
                    fixable=True,
                )
            elif node.op_type == "DequantizeLinear":
                fused = pattern_members(ctx)  # Div/Mul inside a GELU/LayerNorm are one TIDL layer, not eltwise
                symmetric_ops = device.spec.symmetric_input_ops
                users = sorted({c.op_type for c in _effective_consumers(ctx, node.output[0])
                                if c.op_type in symmetric_ops and ctx.producer.get(c.output[0]) not in fused})
                if users:
                    yield self.finding(
                        ctx, node,
                        f"asymmetric activation (zero point {shown}) feeds {', '.join(users)}, which TIDL treats as "
                        "symmetric: the zero point is ignored or requantized there",
                        "quantize this tensor symmetric (zero point 0) in PyTorch, e.g. by placing the layer after "
                        "a ReLU or using a symmetric activation observer",
                        severity="warning",
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
    """TIDL022: weights are quantized per channel where TIDL needs per-tensor.

    Why: TDA4VM takes per-tensor weights only (tidl.md §1; a per-channel model fails there with "Bad node spec ...
    DequantizeLinear"); ConvTranspose, DeformConv, BatchNormalization and PRelu take per-tensor weights on every
    device (tidl.md §2 table). Fix: ``tiexport fix --device NAME`` requantizes those weights per-tensor (max of the
    channel ranges); in PyTorch use ``WT8SYMP2_AT8SYMP2`` for TDA4VM.
    """

    id = "TIDL022"
    title = "per-channel weights where per-tensor is required"
    category = "per_channel"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node in ctx.nodes:
            if node.op_type != "DequantizeLinear" or not ctx.is_weight_dq(node):
                continue
            qp = ctx.qparams(node)
            if qp is None or not qp.per_channel or qp.qtype == TensorProto.INT32:
                continue
            consumers = {c.op_type for c in ctx.consumers_of(node.output[0])}
            if not device.per_channel_weights:
                yield self.finding(
                    ctx, node, f"per-channel weight ({qp.scale.size} scales); {device.name} takes per-tensor weights "
                    "only", f"tiexport fix --device {device.name}, or train with WT8SYMP2_AT8SYMP2", fixable=True,
                )
            elif consumers & device.spec.per_tensor_weight_ops:
                ops = ", ".join(sorted(consumers & device.spec.per_tensor_weight_ops))
                yield self.finding(ctx, node, f"per-channel weight of {ops}, which TIDL takes per-tensor only",
                                   f"tiexport fix --device {device.name}", fixable=True)


class InputQuantizationRule(Rule):
    """TIDL023: the network input is quantized per channel or asymmetric.

    Why: TIDL's input data-convert layer supports symmetric per-tensor quantization only (tidl.md §2 "The network
    input should be quantized symmetric, per-tensor"). Fix: ``tiexport fix`` rewrites the input QuantizeLinear to
    zero point 0 (int8, or uint8 for non-negative input ranges); in PyTorch quantize the input symmetric.
    """

    id = "TIDL023"
    title = "network input not quantized symmetric per-tensor"
    category = "input_quantization"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for vi in ctx.graph_inputs:
            for q in ctx.input_quantizers(vi.name, device.spec.pass_through | {"Cast"}):
                qp = ctx.qparams(q)
                if qp is None:
                    continue
                if qp.per_channel:
                    yield self.finding(ctx, q, f"input {vi.name!r} quantized per channel",
                                       "quantize the network input per-tensor")
                elif not qp.symmetric:
                    sev = "error" if not device.asymmetric_activations else "warning"
                    yield self.finding(
                        ctx, q, f"input {vi.name!r} quantized with zero point {int(qp.zero_points.ravel()[0])}; "
                        "TIDL's input data-convert layer is symmetric only",
                        f"tiexport fix --device {device.name}", severity=sev, fixable=True,
                    )


class MatMulSignRule(Rule):
    """TIDL024: a MatMul mixes signed and unsigned operands in a way TIDL does not support.

    Why: MatMul with signed inputs and an unsigned output is unsupported; on TDA4VM a signed and an unsigned input
    together are unsupported (tidl.md §2 "MatMul"). TI's wrapper makes MatMul inputs symmetric (int8) unless they come
    from Softmax/Relu/Sigmoid. Fix: quantize both MatMul inputs int8 (or both uint8 when non-negative), and the output
    int8 when an input is signed.
    """

    id = "TIDL024"
    title = "MatMul operand signedness unsupported"
    category = "matmul_sign"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
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
            if all(signs) and out_q is not None and not out_q.signed:
                yield self.finding(ctx, node, "signed inputs with an unsigned (uint8) output",
                                   "quantize the MatMul output as int8")
            # Mixed signs matter for two variable operands; a constant B is an InnerProduct weight (always int8).
            b_dq = ctx.dq_of(node.input[1])
            if b_dq is not None and ctx.is_weight_dq(b_dq):
                continue
            if not device.asymmetric_activations and len(set(signs)) > 1:
                yield self.finding(ctx, node, f"one signed and one unsigned input; {device.name} needs both the same",
                                   "quantize both MatMul inputs int8 (symmetric)")
