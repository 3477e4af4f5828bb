"""Graph hygiene rules: what exporters leave behind — float weights behind a QuantizeLinear, redundant or duplicate
Q/DQ, Concat/Add inputs on different scales, bias in another form than TI's tooling writes.

Only TIDL030 rests on a TI source (TI's model optimizer folds such weights by default, rule
``remove_quantize_initializer``); the others are tiexport advice, warnings at most: no TI document says TIDL
rejects redundant Q/DQ, unequal Concat/Add scales or a bias in another form (TI's optimizer writes int32 bias at
``s_in * s_w`` with rule ``add_bias_qdq``, off by default). The 16-bit bias of TDA4VM (TIDL033's clipping part)
rests on edgeai-benchmark's runtime options comment.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from tiexport.context import ModelContext, QParams
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec.sources import BENCHMARK_BIAS_16BIT, OPTIMIZER_FOLD_WEIGHTS
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule

__all__ = ["BiasRule", "RedundantQdqRule", "ScaleMismatchRule", "UnfoldedWeightRule"]


class UnfoldedWeightRule(Rule):
    """TIDL030: a float weight still sits behind a QuantizeLinear (float initializer -> Q -> DQ).

    Why: TI's model optimizer folds these into 8-bit initializers by default (rule ``remove_quantize_initializer``,
    "reduces the model size as input becomes 8-bit"); left in place, the weights are quantized at every inference in
    ONNX Runtime and users report partitioning trouble with them. Fix: ``tiexport fix`` folds the QuantizeLinear
    into an int8 initializer, bit-exact.
    """

    id = "TIDL030"
    title = "float weight behind a QuantizeLinear (not folded)"
    category = "unfolded_weight"
    sources = (OPTIMIZER_FOLD_WEIGHTS,)
    device_independent = True
    severity = "warning"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node in ctx.nodes_of("QuantizeLinear"):
            if node.input and ctx.is_const(node.input[0]) and ctx.const_elem_type(node.input[0]) in (
                    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                yield self.finding(ctx, node, f"float constant {node.input[0]!r} is quantized at run time",
                                   "tiexport fix folds it into an int8 initializer (bit-exact)", fixable=True)


class RedundantQdqRule(Rule):
    """TIDL031: redundant Q/DQ — a DequantizeLinear straight into a QuantizeLinear with the same parameters, or
    several identical Q/DQ nodes reading the same tensor, or a Q/DQ whose result nobody uses.

    Why (tiexport advice): each extra Q/DQ pair is an extra requantization layer for TIDL and users report
    duplicate/shared DQ nodes confusing its partitioning. Rewrites are exact: ``Q(DQ(x)) -> x`` for equal
    parameters, duplicates merged. Fix: ``tiexport fix``.
    """

    id = "TIDL031"
    title = "redundant, duplicate or dead Q/DQ"
    category = "redundant_qdq"
    device_independent = True
    severity = "warning"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        hint = "tiexport fix removes it (exact)"
        for node in ctx.nodes_of("QuantizeLinear"):
            dq = ctx.dq_of(node.input[0]) if node.input else None
            if dq is None:
                continue
            a, b = ctx.qparams(dq), ctx.qparams(node)
            if a is not None and b is not None and a.same_as(b):
                yield self.finding(ctx, node, f"re-quantizes the output of {ctx.node_name(dq)!r} with the same "
                                   "scale and zero point", hint, fixable=True)
        seen: dict[tuple[str, str, str], onnx.NodeProto] = {}
        for node, qp in ctx.quantizers():
            key = (node.op_type, node.input[0], _qkey(qp))
            first = seen.get(key)
            if first is None:
                seen[key] = node
            else:
                yield self.finding(ctx, node, f"duplicate of {ctx.node_name(first)!r} (same input, scale and "
                                   "zero point)", "tiexport fix merges them (exact)", fixable=True)
        for node in ctx.qdq_nodes():
            if node.output and not ctx.consumers.get(node.output[0]) and node.output[0] not in ctx.graph_output_names:
                yield self.finding(ctx, node, "result is never used", "tiexport fix removes dead nodes",
                                   fixable=True)


def _qkey(qp: QParams) -> str:
    return f"{qp.qtype}|{qp.axis if qp.per_channel else ''}|{qp.scale.tobytes().hex()}|{qp.zero_points.tobytes().hex()}"


class ScaleMismatchRule(Rule):
    """TIDL032: Concat (or Add) inputs are quantized with different scales or zero points.

    Why (tiexport advice, not documented by TI): TIDL requantizes Concat inputs to a common scale, which costs a
    layer and some accuracy (AMD's tools align Concat inputs for the same reason): a warning. A residual Add on two
    scales is what every quantizer writes, TI's own WT8SYMP2_AT8SYMP2 exports for TDA4VM included: info.
    Fix: ``tiexport fix --align-scales`` aligns Concat inputs (and Add inputs on TDA4VM) to the largest scale (it
    changes numerics, so it is not done unless asked).
    """

    id = "TIDL032"
    title = "Concat/Add inputs on different scales"
    category = "scale_mismatch"
    severity = "warning"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node in ctx.nodes_of("Concat", "Add"):
            params: list[QParams] = []
            for inp in node.input:
                dq = ctx.dq_of(inp) if inp else None
                if dq is None or ctx.is_weight_dq(dq):
                    params = []
                    break
                qp = ctx.qparams(dq)
                if qp is None or qp.per_channel:
                    params = []
                    break
                params.append(qp)
            if len(params) < 2:
                continue
            scales = {float(np.asarray(p.scale).ravel()[0]) for p in params}
            zps = {int(p.zero_points.ravel()[0]) for p in params}
            if len(scales) == 1 and len(zps) == 1:
                continue
            shown = ", ".join(f"{s:.4g}" for s in sorted(scales))
            if node.op_type == "Concat":
                yield self.finding(ctx, node, f"inputs on different scales ({shown}); TIDL requantizes them",
                                   "tiexport fix --align-scales aligns them to the largest scale (changes numerics)")
            else:
                # a residual Add on two scales is what every quantizer writes, TI's own TDA4VM exports included
                yield self.finding(
                    ctx, node, f"inputs on different scales ({shown}); TIDL rescales them in the Add",
                    "tiexport fix --align-scales aligns them (changes numerics)" if device.align_add_scales
                    else "normal for a residual Add", severity="info",
                )


class BiasRule(Rule):
    """TIDL033: a Conv/Gemm bias is not in the form TIDL's tooling writes, or will be clipped.

    Why: on TDA4VM biases are kept in 16 bits (edgeai-benchmark's runtime options: "the mode where the bias is
    clipped to 16bits (default in TDA4VM)"; by default TIDL adjusts the weight scale instead of clipping), so int32
    values beyond int16 change that layer's numerics. The form of the bias is tiexport advice: TI's model optimizer
    writes bias as int32 ``round(b / (s_in * s_w))`` into a DequantizeLinear with scale ``s_in * s_w`` and zero point
    0 (rule ``add_bias_qdq``); a bias DQ with another scale or a non-zero zero point is requantized to the
    accumulator's scale. A float bias is quantized by TIDL itself (info). Fix: ``tiexport fix --device NAME``
    (``--quantize-bias`` for float biases).
    """

    id = "TIDL033"
    title = "bias not int32 at scale s_in * s_w, or beyond TDA4VM's 16 bits"
    category = "bias"
    severity = "warning"
    sources = (BENCHMARK_BIAS_16BIT,)
    advice_parts = "the bias's type, zero point and scale (TI's optimizer's form)"

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node in ctx.nodes_of("Conv", "Gemm", "ConvTranspose"):
            if len(node.input) < 3 or not node.input[2]:
                continue
            bias = node.input[2]
            dq = ctx.dq_of(bias)
            if dq is None:
                if ctx.is_const(bias):
                    yield self.finding(
                        ctx, node, f"float bias {bias!r}: TIDL quantizes it itself",
                        f"tiexport fix --device {device.name} writes it as int32 + DequantizeLinear"
                        if device.quantize_bias
                        else "fine; tiexport fix --quantize-bias writes it as TI's tooling does",
                        severity="warning" if device.quantize_bias else "info", fixable=device.quantize_bias,
                        advice=True,
                    )
                    expected = _expected_bias_scale(ctx, node)
                    values = ctx.const(bias)
                    if expected is not None and values is not None and values.size:
                        # reshaped, not broadcast: a [1] scale does not broadcast onto a 0-d bias
                        scale = (expected.reshape(values.shape) if expected.size == values.size
                                 else np.full(values.shape, expected.ravel()[0]) if expected.size == 1 else None)
                        if scale is not None:
                            yield from self._clipped(ctx, node, device, np.round(values / scale))
                continue
            qp = ctx.qparams(dq)
            if qp is None:
                continue
            if qp.qtype != TensorProto.INT32:
                yield self.finding(ctx, node, "bias DequantizeLinear is not int32", "quantize bias to int32",
                                   fixable=True, advice=True)
                continue
            if not qp.symmetric:
                yield self.finding(ctx, node, "bias zero point is not 0", "quantize bias with zero point 0",
                                   fixable=True, advice=True)
            expected = _expected_bias_scale(ctx, node)
            if expected is not None:
                got = np.asarray(qp.scale, dtype=np.float64).ravel()
                same_shape = got.size in (1, expected.size) or expected.size == 1
                if not same_shape or not np.allclose(got, expected, rtol=1e-5, atol=0.0):
                    yield self.finding(ctx, node, "bias scale differs from input scale x weight scale: TIDL "
                                       "requantizes it to its accumulator scale", "requantize the bias with scale "
                                       "s_in * s_w", severity="warning", fixable=True, advice=True)
            values = ctx.const(dq.input[0]) if ctx.is_const(dq.input[0]) else None
            if values is not None:
                yield from self._clipped(ctx, node, device, values)

    def _clipped(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile,
                 int_bias: np.ndarray) -> Iterator[Finding]:
        """Bias values (in units of s_in * s_w) beyond the device's bias width are clipped by TIDL."""
        if device.bias_bits >= 32:
            return
        lim = 2 ** (device.bias_bits - 1)
        # float64 holds every int32 exactly; a bias declared as a narrow type (uint2, int4: ml_dtypes arrays)
        # cannot even be compared with 32768
        wide = np.asarray(int_bias, dtype=np.float64)
        n = int(np.sum((wide < -lim) | (wide > lim - 1)))
        if n:
            yield self.finding(
                ctx, node, f"{n} bias value(s) exceed {device.bias_bits} bits: {device.name} keeps biases in "
                f"{device.bias_bits} bits, so TIDL adjusts this layer's weight scale (or, with bias_clipping 1, clips "
                "the bias)",
                "raise the input or weight scale of this layer, or reduce the bias magnitude in training",
                severity="warning", source=BENCHMARK_BIAS_16BIT,
            )


def _expected_bias_scale(ctx: ModelContext, node: onnx.NodeProto) -> np.ndarray | None:
    in_dq = ctx.dq_of(node.input[0])
    w_dq = ctx.dq_of(node.input[1])
    if in_dq is None or w_dq is None:
        return None
    a, w = ctx.qparams(in_dq), ctx.qparams(w_dq)
    if a is None or w is None or a.per_channel:
        return None
    return np.asarray(a.scale, dtype=np.float64).ravel()[0] * np.asarray(w.scale, dtype=np.float64).ravel()
