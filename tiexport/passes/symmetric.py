"""EnforceSymmetricPass: zero point 0 for weights, for the network input, and for every activation on devices that
take symmetric activations only.

TIDL weights are symmetric on every device (tidl.md §2 table, weights column); TDA4VM takes symmetric activations
only (tidl.md §1); TIDL's input data-convert layer is symmetric only (tidl.md §2). "Symmetric" means zero point 0
with int8, or uint8 for non-negative tensors; uint8 with zero point 128 is the same grid as int8 with zero point 0
(tidl.md §2, last bullet). Validator rules TIDL021 and TIDL023.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import (
    ConstEdits,
    QParams,
    const_value,
    dequantize,
    is_const,
    is_graph_output,
    is_non_negative,
    qparams,
    qrange,
    quantize,
    set_qdq_params,
)

__all__ = ["EnforceSymmetricPass", "is_ti_convention", "symmetric_target"]

_SIGNED: dict[np.dtype, np.dtype] = {np.dtype(np.uint8): np.dtype(np.int8), np.dtype(np.int8): np.dtype(np.int8),
           np.dtype(np.uint16): np.dtype(np.int16), np.dtype(np.int16): np.dtype(np.int16)}
_UNSIGNED: dict[np.dtype, np.dtype] = {np.dtype(np.int8): np.dtype(np.uint8), np.dtype(np.uint8): np.dtype(np.uint8),
             np.dtype(np.int16): np.dtype(np.uint16), np.dtype(np.uint16): np.dtype(np.uint16)}
# ops between a graph input and its QuantizeLinear that keep the input's values (validator rule TIDL023 looks
# through the same ones)
_INPUT_PATH_OPS = frozenset({"Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                             "Dropout", "Split", "Slice", "Pad"})


def is_ti_convention(qp: QParams) -> bool:
    """uint8 (uint16) with zero point 127 (32767): how TI's v2 symmetric observers write a symmetric grid."""
    if qp.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        return False
    mid = (int(qrange(qp.dtype)[1]) - 1) // 2  # type: ignore[index]
    return bool(np.all(qp.zero_point.astype(np.int64) == mid))


def symmetric_target(qp: QParams, non_negative: bool) -> tuple[np.ndarray, np.dtype, bool] | None:
    """(scale, quantized type, exact) of a zero-point-0 grid covering ``qp``'s range; None if the type is unknown.

    - uint8 zp 128 -> int8 zp 0, same scale (the same grid: exact);
    - a grid whose lowest value is 0 (int8 zp -128) -> uint8 zp 0, same scale (exact);
    - uint8 zp 127, TI's symmetric convention -> int8 zp 0, same scale: the grid shifted by one step, so only the
      ends move, by one step (``ti_convention``; TI's v2 WT8SYMP2_AT8SYMP2 / WC8SYMP2_AT8SYMP2 exports);
    - a non-negative tensor -> uint8 zp 0 with the old top of the range: ``s' = hi / 255``;
    - otherwise int8 zp 0 covering both ends: ``s' = max(hi / 127, -lo / 128)``.
    """
    if qp.dtype not in _SIGNED:
        return None
    lo_q, _hi_q = qrange(qp.dtype)  # type: ignore[misc]
    signed, unsigned = _SIGNED[qp.dtype], _UNSIGNED[qp.dtype]
    s_lo, s_hi = qrange(signed)  # type: ignore[misc]
    u_hi = qrange(unsigned)[1]  # type: ignore[index]
    z = qp.zero_point.astype(np.int64)
    scale = np.asarray(qp.scale, np.float32)
    if np.all(z == lo_q - s_lo) and lo_q - s_lo != 0:  # uint8 zp 128: shift the grid by 128, same values
        return scale, signed, True
    if np.all(z == lo_q) and qp.dtype.kind == "i":  # int8 zp -128 is uint8 zp 0
        return scale, unsigned, True
    if is_ti_convention(qp):  # uint8 zp 127: keep the scale, move the grid one step
        return scale, signed, False
    lo, hi = qp.float_range()
    if non_negative or np.all(lo >= 0):
        new = np.maximum(hi, 0) / u_hi
        return np.where(new > 0, new, scale).astype(np.float32), unsigned, False
    new = np.maximum(np.maximum(hi, 0) / s_hi, np.minimum(lo, 0) / s_lo)
    return np.where(new > 0, new, scale).astype(np.float32), signed, False


class EnforceSymmetricPass(Pass):
    """Rewrite non-zero zero points to 0 (weights always; activations when ``activations``; graph inputs when
    ``graph_inputs``).

    Rewrites::

        DQ(Q(x, s, 128, uint8)), s, 128) -> DQ(Q(x, s, 0, int8), s, 0)        same grid (exact)
        DQ(Q(x, s, -128, int8))          -> DQ(Q(x, s, 0, uint8))              same grid (exact)
        DQ(Q(x, s, 127, uint8))          -> DQ(Q(x, s, 0, int8))               grid moved one step (ends: 1 step)
        DQ(Q(relu(x), s, z, uint8))      -> DQ(Q(relu(x), s', 0, uint8))       s' = (255 - z) s / 255
        DQ(Q(x, s, z))                   -> DQ(Q(x, s', 0, int8))              s' covers [(lo - z) s, (hi - z) s]
        DQ(w_q, s, z)  (weight)          -> DQ(w_q - z, s, 0, int8)            exact when w_q - z fits int8
        DQ(w_q, s, z)  (weight)          -> DQ(round(w / s'), s', 0, int8)     otherwise, s' = max|w| / 127

    A QuantizeLinear and the DequantizeLinear nodes reading it always change together. Skipped (with a note):
    per-channel activations, a QuantizeLinear whose output is a graph output or feeds something other than a
    DequantizeLinear with its parameters. With ``activations`` off (devices that take asymmetric activations), a
    graph input in TI's uint8 zero point 127 convention is left as it is: TI calls that grid symmetric.
    """

    def __init__(self, *, activations: bool = True, weights: bool = True, graph_inputs: bool = True) -> None:
        self.activations = activations
        self.weights = weights
        self.graph_inputs = graph_inputs

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(activations={self.activations}, weights={self.weights}, "
                f"graph_inputs={self.graph_inputs})")

    def run(self, graph: gs.Graph) -> PassResult:
        edits = ConstEdits(graph)
        changes = 0
        numerics = False
        notes: list[str] = []
        input_qs = self._input_quantizers(graph) if self.graph_inputs and not self.activations else set()
        for node in list(graph.nodes):
            if node.op == "DequantizeLinear" and self.weights and is_const(node.inputs[0]):
                done = self._weight(node, edits)
                if done is not None:
                    changes += 1
                    numerics |= not done
            elif node.op == "QuantizeLinear" and not is_const(node.inputs[0]) and (
                    self.activations or id(node) in input_qs):
                if not self.activations and (qp := qparams(node)) is not None and is_ti_convention(qp):
                    continue
                done = self._activation(graph, node, edits, notes)
                if done is not None:
                    changes += 1
                    numerics |= not done
        edits.commit()
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=numerics, notes=notes)

    # -------------------------------------------------------------------------------------------------- weights
    def _weight(self, node: gs.Node, edits: ConstEdits) -> bool | None:
        """Rewrite one weight DQ; returns True (exact), False (requantized) or None (nothing to do)."""
        qp = qparams(node)
        if qp is None or not qp.valid or qp.symmetric or qp.dtype not in _SIGNED:
            return None
        data = const_value(node.inputs[0])
        if data is None:
            return None
        axis = qp.axis if qp.per_channel else 0
        if qp.per_channel and not -data.ndim <= axis < data.ndim:
            return None
        target = _SIGNED[qp.dtype]
        t_lo, t_hi = qrange(target)  # type: ignore[misc]
        zb = qp.zero_point.astype(np.int64)
        if qp.per_channel:
            shape = [1] * data.ndim
            shape[axis % data.ndim] = -1
            zb = zb.reshape(shape)
        shifted = data.astype(np.int64) - zb
        if shifted.min(initial=0) >= t_lo and shifted.max(initial=0) <= t_hi:
            new_q, new_scale, exact = shifted.astype(target), np.asarray(qp.scale, np.float32), True
        else:
            w = dequantize(data, qp.scale, qp.zero_point, axis=axis).astype(np.float64)
            red = tuple(i for i in range(w.ndim) if i != axis % max(w.ndim, 1)) if qp.per_channel else None
            amax = np.abs(w).max(axis=red) if w.size else np.zeros(qp.scale.shape)
            new_scale = np.where(amax > 0, amax / t_hi, qp.scale).astype(np.float32).reshape(qp.scale.shape)
            new_q = quantize(w, new_scale, np.zeros(new_scale.shape, np.int64), target, axis=axis)
            exact = False
        edits.set(node, 0, new_q)
        edits.set(node, 1, new_scale)
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            edits.set(node, 2, np.zeros(qp.scale.shape, target))
        return exact

    # -------------------------------------------------------------------------------------------------- activations
    def _activation(self, graph: gs.Graph, q: gs.Node, edits: ConstEdits, notes: list[str]) -> bool | None:
        qp = qparams(q)
        if qp is None or not qp.valid or qp.symmetric:
            return None
        if qp.per_channel:
            notes.append(f"{q.name}: per-channel activation; zero point kept")
            return None
        out = q.outputs[0]
        if is_graph_output(graph, out):
            notes.append(f"{q.name}: output {out.name!r} is a graph output; zero point kept")
            return None
        dqs = list(out.outputs)
        for dq in dqs:
            dqp = qparams(dq) if dq.op == "DequantizeLinear" else None
            if dqp is None or not dqp.same_as(qp):
                notes.append(f"{q.name}: its output feeds {dq.name} ({dq.op}), not a matching DequantizeLinear; "
                             "zero point kept")
                return None
        target = symmetric_target(qp, is_non_negative(q.inputs[0]))
        if target is None:
            return None
        scale, dtype, exact = target
        set_qdq_params([q, *dqs], edits, scale, np.zeros(qp.scale.shape, dtype), dtype)
        return exact

    @staticmethod
    def _input_quantizers(graph: gs.Graph) -> set[int]:
        found: set[int] = set()
        stack = [(t, 0) for t in graph.inputs]
        while stack:
            t, depth = stack.pop()
            for c in t.outputs:
                if c.op == "QuantizeLinear":
                    found.add(id(c))
                elif c.op in _INPUT_PATH_OPS and depth < 4:
                    stack.extend((o, depth + 1) for o in c.outputs)
        return found
