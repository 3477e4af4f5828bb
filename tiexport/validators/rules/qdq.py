"""Quantization-format rules: is the model prequantized QDQ at all (or TI's legacy Clip-based QAT v1), and are its
Q/DQ nodes well-formed, 8-bit, on the right axis and present where TIDL needs them.

Sources (``tiexport.tidl_spec.sources``): edgeai-tidl-tools ``docs/tidl_fsg_quantization.md`` (QDQ models need
``prequantized_model``; pre-quantized models are 8-bit only; QAT [TDA4VM specific] with range nodes), the ONNX
QuantizeLinear/DequantizeLinear specification, the Q/DQ rows of the 11.0 operator table ("Only default axis = 1"),
and TIDL's per-layer quantization table (the 11.2-era ``docs/quantization.md``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from tiexport.context import ModelContext, dtype_name
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import FUSED_INTO_NEXT, NEEDS_QDQ, PASS_THROUGH, get_spec
from tiexport.tidl_spec.sources import (
    BENCHMARK_QAT_V1_CONFIG,
    LAYER_QUANT_TABLE,
    ONNX_QDQ_SPEC,
    QAT_V1_DOC,
    QUANT_8BIT_ONLY,
    QUANT_PREQUANTIZED_QDQ,
)
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule

__all__ = [
    "BitWidthRule",
    "InvalidQParamsRule",
    "NotPrequantizedRule",
    "QdqAxisRule",
    "QdqCoverageRule",
    "weight_channel_axis",
]

_QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "QGemm",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention",
})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def weight_channel_axis(ctx: ModelContext, consumer: onnx.NodeProto, input_index: int) -> int | None:
    """The output-channel axis of a weight input, for the ops TIDL takes per-channel weights on; else None."""
    if consumer.op_type == "Conv" and input_index == 1:
        return 0
    if consumer.op_type == "ConvTranspose" and input_index == 1:
        return 1
    if consumer.op_type == "Gemm" and input_index == 1:
        return 0 if ctx.int_attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul" and input_index == 1:
        rank = ctx.rank(consumer.input[1])
        return None if rank is None else rank - 1
    return None


class NotPrequantizedRule(Rule):
    """TIDL010: the model has no QuantizeLinear/DequantizeLinear: it is a float (or QOperator) model.

    Why: with ``advanced_options:prequantized_model: 1`` TIDL reads scales and zero points from Q/DQ nodes and skips
    calibration (``tidl_fsg_quantization.md``: "ONNX QDQ Models: This requires prequantized_model to be set to 1").
    A float model has none: TIDL would calibrate it itself (``accuracy_level`` 1), and the PyTorch QAT/PTC ranges are
    not used. QOperator models (QLinearConv...) are a different format that the QDQ import does not read.
    TI's legacy QAT v1 format is recognized instead (an info finding, which names the format): a float graph whose
    ranges are Clip nodes at powers of two after the layers (torchmodelopt v1's PACT2, exported in eval mode), which
    ``tidl_fsg_quantization.md`` "D. Quantization Aware Training (QAT) [TDA4VM Specific]" describes: compile it with
    ``accuracy_level: 0`` and ``quantization_scale_type: 1`` (edgeai-benchmark ``runtime_options_onnx_qat_v1``) and
    without ``prequantized_model``. edgeai-benchmark compiles its own v1 models (``configs/classification.py``,
    cl-6098...) with those options for every device and the model zoo ships their AM67A/AM68A/AM69A artifacts, so
    on MMAv2 devices it is info too.
    Fix: export the fake-quant model (``tiexport.export``) or quantize with ``quant_format=QuantFormat.QDQ``.
    """

    id = "TIDL010"
    title = "model is not prequantized (no Q/DQ nodes)"
    category = "not_prequantized"
    sources = (QUANT_PREQUANTIZED_QDQ, QAT_V1_DOC, BENCHMARK_QAT_V1_CONFIG)
    needs_qdq = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        if ctx.is_quantized:
            return
        if ctx.qat_v1_clips:
            n = len(ctx.qat_v1_clips)
            where = "" if device.power_of_two_scales else (
                "; TI documents the flow for TDA4VM, and compiles its own v1 models (cl-6098...) with the same "
                "options for every device: its model zoo ships them for AM67A, AM68A and AM69A too")
            yield self.finding(
                ctx, None,
                f"TIDL QAT v1 model ({n} Clip nodes at power-of-2 ranges, no Q/DQ): TIDL takes its ranges from the "
                f"Clip nodes with accuracy_level 0 and quantization_scale_type 1, without prequantized_model{where}",
                "tiexport snippet writes the v1 options (runtime_options_onnx_qat_v1); for new models on MMAv2 "
                "devices prefer a QDQ export (QATFxModule + export)" if where
                else "tiexport snippet writes the v1 options (runtime_options_onnx_qat_v1)",
                severity="info", source=QAT_V1_DOC if not where else BENCHMARK_QAT_V1_CONFIG)
            return
        qop = sorted({n.op_type for n in ctx.nodes if n.op_type in _QOPERATOR_OPS})
        if qop:
            yield self.finding(
                ctx, None,
                f"QOperator-format model ({', '.join(qop)}): TIDL's prequantized import reads QDQ models only",
                "re-quantize with quant_format=QuantFormat.QDQ, or export the fake-quant PyTorch model",
            )
            return
        yield self.finding(
            ctx, None,
            "float model: no QuantizeLinear/DequantizeLinear nodes, so prequantized_model: 1 has nothing to read; "
            "TIDL would calibrate it itself and your PyTorch quantization would not be used",
            "export the PTC/QAT fake-quant model with tiexport.export, or compile as a float model "
            "(runtime_options_onnx_np2, accuracy_level 1) without prequantized_model",
        )


class InvalidQParamsRule(Rule):
    """TIDL011: a Q/DQ node has unusable quantization parameters.

    Flags: scale not a constant; scale not float32; scale <= 0, NaN or Inf; zero point not constant or not the
    quantized type; zero point shape differing from scale; per-axis scale whose length differs from the axis dim;
    axis out of range; blocked quantization; QuantizeLinear of a non-float tensor; DequantizeLinear of a float tensor.
    Why: TIDL reads scales and zero points as constants from each Q/DQ (tidl.md §2); ONNX's QuantizeLinear spec
    requires these shapes and types. Fix: re-export; a correct exporter never writes these.
    """

    id = "TIDL011"
    title = "invalid scale or zero point on a Q/DQ node"
    category = "invalid_qparams"
    sources = (ONNX_QDQ_SPEC, get_spec().op_source("DequantizeLinear"))
    device_independent = True
    in_subgraphs = True
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        hint = "re-export the model; scales must be positive finite float32 constants"
        for node in ctx.qdq_nodes():
            if len(node.input) < 2 or not node.input[1]:
                yield self.finding(ctx, node, "missing scale input", hint)
                continue
            scale_name = node.input[1]
            one_element: list[str] = []
            if not ctx.is_const(scale_name):
                yield self.finding(ctx, node, f"scale {scale_name!r} is computed at run time, not a constant",
                                   "TIDL reads constant scales; export with frozen observers")
                continue
            scale = ctx.const(scale_name)
            if scale is None:
                yield self.finding(ctx, node, f"scale {scale_name!r} cannot be decoded", hint)
                continue
            stype = ctx.const_elem_type(scale_name)
            if stype != TensorProto.FLOAT:
                yield self.finding(ctx, node, f"scale has type {dtype_name(stype or 0)}, TIDL expects float",
                                   "store scales as float32")
            if scale.size == 0:
                yield self.finding(ctx, node, "scale is empty", hint)
                continue
            if scale.dtype.kind == "f" and (not np.all(np.isfinite(scale)) or np.any(scale <= 0)):
                bad = scale[~np.isfinite(scale) | (scale <= 0)].ravel()[:3]
                yield self.finding(ctx, node, f"scale must be positive and finite, found {bad.tolist()}", hint)
            zp_name = node.input[2] if len(node.input) > 2 else ""
            if zp_name:
                if not ctx.is_const(zp_name):
                    yield self.finding(ctx, node, f"zero point {zp_name!r} is not a constant",
                                       "TIDL reads constant zero points")
                    continue
                zp = ctx.const(zp_name)
                if zp is None:
                    yield self.finding(ctx, node, f"zero point {zp_name!r} cannot be decoded", hint)
                    continue
                if zp.shape != scale.shape and zp.size == scale.size == 1:
                    # ONNX Runtime's quantizer writes these ([1] vs []): one value each, per-tensor in effect
                    one_element.append(f"zero point shape {list(zp.shape)} vs scale shape {list(scale.shape)}")
                elif zp.shape != scale.shape:
                    yield self.finding(ctx, node, f"zero point shape {list(zp.shape)} differs from scale shape "
                                       f"{list(scale.shape)}", hint)
                out_dtype = ctx.int_attr(node, "output_dtype", 0)
                zp_type = ctx.const_elem_type(zp_name)
                if node.op_type == "QuantizeLinear" and out_dtype and zp_type != out_dtype:
                    yield self.finding(ctx, node, f"zero point type {dtype_name(zp_type or 0)} differs from "
                                       f"output_dtype {dtype_name(out_dtype)}", hint)
                if node.op_type == "DequantizeLinear":
                    src = ctx.elem_type(node.input[0])
                    if src is not None and zp_type is not None and src != zp_type:
                        yield self.finding(ctx, node, f"zero point type {dtype_name(zp_type)} differs from the "
                                           f"input's type {dtype_name(src)}", hint)
            if ctx.int_attr(node, "block_size", 0):
                yield self.finding(ctx, node, "blocked quantization (block_size) is not supported by TIDL",
                                   "use per-tensor or per-channel quantization")
            if scale.ndim > 1:
                yield self.finding(ctx, node, f"scale has rank {scale.ndim}; only scalars and 1-D per-axis scales "
                                   "are supported", hint)
            elif scale.ndim == 1:
                rank = ctx.rank(node.input[0])
                axis = ctx.int_attr(node, "axis", 1)
                if rank is not None and scale.size == 1 and not -rank <= axis < rank:
                    # A one-element scale is per-tensor whatever the axis: ONNX Runtime's quantize_static and TI's
                    # own v2 exports write the int32 bias DequantizeLinear so (rank-1 input, default axis 1), and
                    # TI's operator table takes the default axis (supported_ops_rts_versions.md, Q/DQ rows).
                    one_element.append(f"one-element scale with axis {axis} on a rank-{rank} input")
                elif rank is not None:
                    if not -rank <= axis < rank:
                        yield self.finding(ctx, node, f"axis {axis} is out of range for a rank-{rank} input", hint)
                    else:
                        dims = ctx.const_shape(node.input[0]) if ctx.is_const(node.input[0]) else ctx.shape(
                            node.input[0])
                        dim = dims[axis] if dims is not None else None
                        if isinstance(dim, int) and scale.size not in (1, dim):
                            yield self.finding(ctx, node, f"{scale.size} scales for axis {axis} of size {dim}", hint)
            data_type = ctx.const_elem_type(node.input[0]) if ctx.is_const(node.input[0]) else ctx.elem_type(
                node.input[0])
            if data_type is not None:
                if node.op_type == "QuantizeLinear" and data_type not in _FLOAT_TYPES:
                    yield self.finding(ctx, node, f"QuantizeLinear of a {dtype_name(data_type)} tensor",
                                       "QuantizeLinear takes float input; remove the extra quantization")
                if node.op_type == "DequantizeLinear" and data_type in _FLOAT_TYPES:
                    yield self.finding(ctx, node, f"DequantizeLinear of a {dtype_name(data_type)} tensor",
                                       "DequantizeLinear takes integer input; a QuantizeLinear is missing before it")
            if one_element:
                # what ONNX Runtime's quantizer and TI's own exports write: a hygiene note, not an import problem
                yield self.finding(ctx, node, "; ".join(one_element) + ": per-tensor in effect",
                                   "tiexport fix writes scale and zero point as scalars (exact)",
                                   severity="info", fixable=True)


class BitWidthRule(Rule):
    """TIDL012: a Q/DQ node quantizes to something other than int8/uint8.

    Why: "ONNX and TFLite pre-quantized model has limitation of supporting only 8-bit" (``tidl_fsg_quantization.md``);
    16-bit or mixed precision goes through TIDL's own options instead. int32 is allowed for a Conv/Gemm bias
    DequantizeLinear (TI's model optimizer writes biases so, rule ``add_bias_qdq``). Fix: quantize to 8 bits
    (``WC8_AT8``...), or use TIDL's mixed precision options instead of 16-bit Q/DQ.
    """

    id = "TIDL012"
    title = "Q/DQ with a bit width other than 8"
    category = "bit_width"
    sources = (QUANT_8BIT_ONLY,)
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node, qp in ctx.quantizers():
            if qp.qtype in (TensorProto.INT8, TensorProto.UINT8):
                continue
            if qp.qtype == TensorProto.INT32 and node.op_type == "DequantizeLinear" and _is_bias_dq(ctx, node):
                continue
            sev = "error" if device.accelerator else "info"
            yield self.finding(
                ctx, node, f"quantized type is {dtype_name(qp.qtype)}; TIDL's prequantized import takes 8-bit only",
                "quantize to int8/uint8; for 16-bit layers use TIDL's output_feature_16bit_names_list instead",
                severity=sev,
            )


def _is_bias_dq(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    out = node.output[0] if node.output else ""
    cons = ctx.consumers.get(out, [])
    return bool(cons) and all(
        ctx.nodes[i].op_type in ("Conv", "Gemm", "ConvTranspose")
        and len(ctx.nodes[i].input) > 2 and ctx.nodes[i].input[2] == out
        for i in cons
    )


class QdqAxisRule(Rule):
    """TIDL013: a Q/DQ node quantizes per channel on an axis TIDL does not support.

    Why: activations are per-tensor for every TIDL layer, and per-channel is for weights, along the output channels
    (TIDL's per-layer quantization table: Conv weights "Symmetric, Per-channel", InnerProduct "Per-column
    (initializer B input)"); the Q/DQ rows of the 11.0 operator table take "only default axis = 1", which per-axis
    weights of TI's own exports (axis 0) read as the activation rule. Conv weight axis 0; Gemm axis 0 with
    transB=1; MatMul B its last axis. Fix: re-export activations per-tensor; quantize weights along the output
    channels.
    """

    id = "TIDL013"
    title = "per-channel Q/DQ on an unsupported axis"
    category = "qdq_axis"
    sources = (LAYER_QUANT_TABLE, get_spec().op_source("QuantizeLinear"))
    device_independent = True

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for node, qp in ctx.quantizers():
            if not qp.per_channel:
                continue
            rank = ctx.rank(node.input[0])
            axis = qp.axis + rank if rank is not None and qp.axis < 0 else qp.axis
            is_weight = ctx.is_const(node.input[0]) or (node.op_type == "DequantizeLinear" and ctx.is_weight_dq(node))
            if node.op_type == "QuantizeLinear" and ctx.is_const(node.input[0]):
                is_weight = True
            if not is_weight:
                yield self.finding(ctx, node, f"activation quantized per channel (axis {qp.axis}); TIDL takes "
                                   "per-tensor activations only", "quantize activations per-tensor")
                continue
            if node.op_type != "DequantizeLinear":
                continue
            for cons in ctx.consumers_of(node.output[0]):
                if node.output[0] not in cons.input:
                    continue  # read inside an If/Loop body: no weight axis to compare with
                idx = list(cons.input).index(node.output[0])
                want = weight_channel_axis(ctx, cons, idx)
                if want is not None and axis != want:
                    yield self.finding(
                        ctx, node,
                        f"weight of {cons.op_type} {ctx.node_name(cons)!r} quantized along axis {qp.axis}, "
                        f"its output channels are axis {want}",
                        f"quantize the weight per channel along axis {want}",
                    )


# Ops whose inputs after the first are weights or parameters, not activations.
_FIRST_INPUT_ONLY = frozenset({
    "Conv", "ConvTranspose", "Gemm", "DeformConv", "BatchNormalization", "LayerNormalization", "PRelu", "Resize",
    "Upsample", "Gather",
})

_PATTERN_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Pow", "Sqrt", "Reciprocal", "Erf", "ReduceMean", "Sigmoid"})


def pattern_members(ctx: ModelContext) -> frozenset[int]:
    """Positions of nodes inside decomposed GELU, LayerNorm and SiLU patterns.

    TIDL fuses these into one layer and needs Q/DQ only at the pattern's end (tidl.md §2 "LayerNorm/GELU/SiLU
    patterns need Q/DQ only at their end"): the GELU ``x * 0.5 * (1 + erf(x / sqrt(2)))`` around an Erf, the
    LayerNorm ``(x - mean(x)) / sqrt(mean((x - mean)^2) + eps) * g + b`` around its ReduceMeans, and the SiLU
    ``x * sigmoid(x)``. Members are found by walking from the marker (Erf, ReduceMean, Sigmoid) through the pattern's
    float ops; Q/DQ nodes end the walk.
    """
    cached: frozenset[int] | None = ctx.cache.get("qdq.pattern_members")
    if cached is not None:
        return cached
    members: set[int] = set()

    def walk(start: int, limit: int) -> set[int]:
        seen = {start}
        frontier = [start]
        while frontier and len(seen) < limit:
            i = frontier.pop()
            node = ctx.nodes[i]
            neighbours = [ctx.producer.get(t) for t in node.input if t]
            neighbours += [j for t in node.output if t for j in ctx.consumers.get(t, [])]
            for j in neighbours:
                if j is not None and j not in seen and ctx.nodes[j].op_type in _PATTERN_OPS:
                    seen.add(j)
                    frontier.append(j)
        return seen

    for i, node in enumerate(ctx.nodes):
        if node.op_type == "Erf":
            members |= walk(i, 6)
        elif node.op_type == "ReduceMean":
            members |= walk(i, 10)
        elif node.op_type == "Sigmoid" and node.input and node.output:
            x = node.input[0]
            for j in ctx.consumers.get(node.output[0], []):
                mul = ctx.nodes[j]
                if mul.op_type == "Mul" and x in mul.input:
                    members |= {i, j}
    result = frozenset(members)
    ctx.cache["qdq.pattern_members"] = result
    return result


class QdqCoverageRule(Rule):
    """TIDL014: a layer that needs Q/DQ reads a float tensor, or its output is never requantized.

    Why: in a prequantized model TIDL takes each layer's input and output ranges from the surrounding Q/DQ; the
    layers with "Requires QDQ Nodes: Yes" in TIDL's per-layer quantization table get no quantization parameters
    without them. The table's notes are the exceptions: Conv/ConvTranspose/Add/Mul/Sub/Div/BatchNorm followed by a
    Relu that has Q/DQ after it; Conv/ConvTranspose followed by a BatchNorm with Q/DQ; LayerNorm/GELU/SiLU patterns
    need Q/DQ only at their end; Reshape, Transpose, Flatten, Split, Slice, Pad, Squeeze pass quantization through.
    Also flagged, as tiexport advice: a QuantizeLinear whose output is a graph output with no DequantizeLinear after
    it, so the network returns integer codes (TI's exports end every output with a DequantizeLinear).
    Fix: quantize the layer (in PyTorch: make sure an observer/fake-quant sits at its inputs and output).
    """

    id = "TIDL014"
    title = "layer without the Q/DQ TIDL needs around it"
    category = "qdq_coverage"
    sources = (LAYER_QUANT_TABLE,)
    advice_parts = "a graph output that is a QuantizeLinear's integer codes"
    device_independent = True

    def _quantized_source(self, ctx: ModelContext, tensor: str, through: frozenset[str], depth: int = 0) -> bool:
        if ctx.is_const(tensor):
            return True
        node = ctx.producer_of(tensor)
        if node is None:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        if node.op_type in through and depth < 16 and node.input:
            return self._quantized_source(ctx, node.input[0], through, depth + 1)
        return False

    def _requantized(self, ctx: ModelContext, tensor: str, through: frozenset[str], depth: int = 0) -> bool:
        cons = ctx.consumers_of(tensor)
        if not cons:
            return False
        for c in cons:
            if c.op_type == "QuantizeLinear":
                continue
            if c.op_type in through and depth < 16 and c.output:
                if not self._requantized(ctx, c.output[0], through, depth + 1):
                    return False
                continue
            return False
        return True

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        members = pattern_members(ctx)
        for pos, node in enumerate(ctx.nodes):
            if node.op_type not in NEEDS_QDQ:
                continue
            inside = pos in members
            data_inputs = list(node.input)
            if node.op_type in _FIRST_INPUT_ONLY:
                data_inputs = data_inputs[:1]
            for inp in data_inputs:
                if inp and not ctx.is_const(inp) and not self._quantized_source(ctx, inp, PASS_THROUGH):
                    if inside and ctx.producer.get(inp) in members:
                        continue  # an edge inside a fused GELU/LayerNorm/SiLU pattern
                    producer = ctx.producer_of(inp)
                    fused = producer is not None and node.op_type in FUSED_INTO_NEXT.get(producer.op_type, ())
                    if fused:
                        continue
                    yield self.finding(ctx, node, f"input {inp!r} is float: no DequantizeLinear before this layer",
                                       "quantize this layer's input (add an activation fake-quant in PyTorch)")
            for idx in (1,) if node.op_type in ("Conv", "ConvTranspose", "Gemm") else ():
                if len(node.input) > idx and ctx.is_const(node.input[idx]):
                    yield self.finding(ctx, node, f"weight {node.input[idx]!r} is float, not quantized",
                                       "quantize the weights (DequantizeLinear of an int8 initializer)")
            out = node.output[0] if node.output else ""
            if not out or self._requantized(ctx, out, PASS_THROUGH):
                continue
            cons = ctx.consumers_of(out)
            if cons and all(c.op_type in FUSED_INTO_NEXT.get(node.op_type, ()) for c in cons):
                continue
            if inside and all(j in members for j in ctx.consumers.get(out, [])):
                continue
            if out in ctx.graph_output_names and not cons:
                continue  # a float network output: TIDL's output data-convert handles it
            yield self.finding(ctx, node, f"output {out!r} is not requantized (no QuantizeLinear after it)",
                               "quantize this layer's output, or fuse it with the next quantized layer",
                               severity="warning")
        for node in ctx.nodes_of("QuantizeLinear"):
            out = node.output[0] if node.output else ""
            if out in ctx.graph_output_names and not any(
                    c.op_type == "DequantizeLinear" for c in ctx.consumers_of(out)):
                yield self.finding(ctx, node, f"graph output {out!r} is this QuantizeLinear's integer codes: no "
                                   "DequantizeLinear after it", "end the network with the DequantizeLinear of the "
                                   "output's quantization (a float output), as TI's exports do", severity="warning",
                                   advice=True)
