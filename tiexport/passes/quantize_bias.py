"""QuantizeBiasPass: write a float Conv/Gemm bias as int32 + DequantizeLinear at scale ``s_in * s_w``.

This is the form TI's tooling writes (tidl.md §2 "Bias": int32 ``round(b / (s_in * s_w))`` into a DequantizeLinear
with scale ``s_in * s_w`` and zero point 0); it is off by default in TI's optimizer and on in the device profiles
that set ``quantize_bias`` (validator rule TIDL033).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import Names, const_value, insert_before, is_const, producer, qparams, quantize

__all__ = ["BIAS_OPS", "QuantizeBiasPass", "bias_scale"]

BIAS_OPS = frozenset({"Conv", "Gemm", "ConvTranspose"})
# ops that carry their input's quantization through unchanged (tidl.md §2 table, last rows)
_PASS_THROUGH = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def _input_dq(t: gs.Tensor) -> gs.Node | None:
    for _ in range(8):
        p = producer(t)
        if p is None:
            return None
        if p.op == "DequantizeLinear":
            return p
        if p.op not in _PASS_THROUGH or not p.inputs:
            return None
        t = p.inputs[0]
    return None


def _weight_axis(node: gs.Node) -> int:
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 0


def bias_scale(node: gs.Node) -> tuple[np.ndarray | None, str]:
    """The bias scale ``s_in * s_w`` of a Conv/Gemm/ConvTranspose (scalar or per output channel), or None and why."""
    if len(node.inputs) < 2:
        return None, "no weight input"
    in_dq = _input_dq(node.inputs[0])
    w_dq = producer(node.inputs[1])
    if in_dq is None:
        return None, "input is not quantized (no DequantizeLinear before it)"
    if w_dq is None or w_dq.op != "DequantizeLinear":
        return None, "weight is not quantized (no DequantizeLinear)"
    a, w = qparams(in_dq), qparams(w_dq)
    if a is None or w is None or not a.valid or not w.valid:
        return None, "input or weight quantization parameters are not usable constants"
    if a.per_channel:
        return None, "input is quantized per channel"
    if w.per_channel:
        rank = len(const_value(w_dq.inputs[0]).shape) if is_const(w_dq.inputs[0]) else None  # type: ignore[union-attr]
        axis = w.axis % rank if rank else w.axis
        if axis != _weight_axis(node):
            return None, f"weight is quantized along axis {w.axis}, not its output channels"
        if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            return None, "grouped ConvTranspose with per-channel weights"
    s = np.float64(np.asarray(a.scale).ravel()[0]) * np.asarray(w.scale, dtype=np.float64)
    return s.astype(np.float32), ""


class QuantizeBiasPass(Pass):
    """Quantize a float bias constant of Conv/Gemm/ConvTranspose to int32 behind a DequantizeLinear.

    Rewrites::

        Conv(DQ(x, s_in), DQ(w, s_w), b_float) -> Conv(DQ(x, s_in), DQ(w, s_w), DQ(b_int32, s_in * s_w, 0))

    ``b_int32 = round(b / (s_in * s_w))`` (per output channel when the weight is per-channel), so the bias moves to
    the accumulator's grid: outputs change by at most half a step of ``s_in * s_w`` before the output quantization.
    The DequantizeLinear's output takes the bias tensor's name (``conv.bias``), the integer constant becomes
    ``conv.bias_quantized`` and the node ``conv.bias_DequantizeLinear``, as ONNX Runtime's quantizer names them.
    Skipped (with a note): the input or weight is not quantized, or the weight's channel axis is not the output axis.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        notes: list[str] = []
        names = Names(graph)
        for node in list(graph.nodes):
            if node.op not in BIAS_OPS or len(node.inputs) < 3 or node.inputs[2].is_empty():
                continue
            bias_t = node.inputs[2]
            if not is_const(bias_t):
                continue
            b = const_value(bias_t)
            if b is None or b.dtype.kind != "f":
                continue
            scale, why = bias_scale(node)
            if scale is None:
                notes.append(f"{node.name}: float bias not quantized: {why}")
                continue
            per_channel = scale.size > 1
            if per_channel and b.size != scale.size:
                notes.append(f"{node.name}: bias has {b.size} values for {scale.size} channel scales; not quantized")
                continue
            axis = b.ndim - 1 if per_channel else 0
            if not per_channel:
                scale = scale.reshape(())
            q = quantize(b, scale, np.zeros(scale.shape, np.int32), np.int32, axis=axis)
            sole_reader = len(bias_t.outputs) == 1 and isinstance(bias_t, gs.Constant)
            if sole_reader:
                names.taken.discard(bias_t.name)  # the DequantizeLinear output takes over the bias's name
            base = bias_t.name
            out_name = names(base if sole_reader else f"{base}_{node.name}")
            q_const = gs.Constant(names(f"{base}_quantized"), np.ascontiguousarray(q))
            s_const = gs.Constant(names(f"{base}_quantized_scale"), np.asarray(scale, np.float32))
            z_const = gs.Constant(names(f"{base}_quantized_zero_point"), np.zeros(scale.shape, np.int32))
            out = gs.Variable(out_name, dtype=np.float32, shape=list(b.shape))
            attrs = {"axis": axis} if per_channel else {}
            dq = gs.Node("DequantizeLinear", names(f"{base}_DequantizeLinear"), attrs,
                         inputs=[q_const, s_const, z_const], outputs=[out])
            node.inputs[2] = out
            insert_before(graph, dq, node)
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=changes > 0, notes=notes)
