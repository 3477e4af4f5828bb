"""AlignBiasScalePass: keep an integer bias on the accumulator's grid, ``s_in * s_w`` with zero point 0, as int32.

TIDL reads a bias DequantizeLinear as int32 at scale ``s_in * s_w`` (tidl.md §2 "Bias"; validator rule TIDL033).
Exporters sometimes write another scale or type, and every pass that changes an input or weight scale (power of
two, per-tensor weights, symmetric activations, aligned Concat/Add scales) leaves the bias behind; this pass runs
after them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import ConstEdits, const_value, dequantize, is_const, producer, qparams, quantize
from tiexport.passes.quantize_bias import BIAS_OPS, bias_scale

__all__ = ["AlignBiasScalePass"]

_RTOL = 1e-5  # the tolerance validator rule TIDL033 applies; float32 products of the same scales differ by an ulp


class AlignBiasScalePass(Pass):
    """Requantize an integer bias DequantizeLinear to int32, zero point 0, scale ``s_in * s_w``.

    Rewrites::

        Conv(DQ(x, s_in), DQ(w, s_w), DQ(b, s_b, z_b)) -> Conv(..., DQ(b', s_in * s_w, 0))
            b' = round((b - z_b) * s_b / (s_in * s_w)) as int32                      (numerics: within half a step)
        DQ(b_int8, s_b, z_b) -> DQ(b_int32, s_b, 0),  b_int32 = b - z_b     when s_in * s_w is unknown (exact)

    Skipped (with a note): the bias DequantizeLinear reads a non-constant, or its scale length does not fit.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        numerics = False
        notes: list[str] = []
        edits = ConstEdits(graph)
        for node in graph.nodes:
            if node.op not in BIAS_OPS or len(node.inputs) < 3 or node.inputs[2].is_empty():
                continue
            dq = producer(node.inputs[2])
            if dq is None or dq.op != "DequantizeLinear" or not is_const(dq.inputs[0]):
                continue
            qp = qparams(dq)
            data = const_value(dq.inputs[0])
            if qp is None or not qp.valid or data is None:
                continue
            expected, _why = bias_scale(node)
            is_int32 = qp.dtype == np.dtype(np.int32)
            if expected is not None:
                got = np.asarray(qp.scale, np.float64).ravel()
                want = np.asarray(expected, np.float64).ravel()
                if is_int32 and qp.symmetric and _close(got, want):
                    continue
            elif is_int32 and qp.symmetric:
                continue
            axis = qp.axis if qp.per_channel else 0
            values = dequantize(data, qp.scale, qp.zero_point, axis=axis).astype(np.float64) if expected is not None \
                else None
            if expected is None:
                # scale unknown: only the type and zero point change, exactly
                new_scale = np.asarray(qp.scale, np.float32)
                new_q = (data.astype(np.int64) - _bcast(qp.zero_point, data.ndim, axis)).astype(np.int32)
            else:
                new_scale = np.asarray(expected, np.float32)
                if new_scale.size == 1:
                    new_scale = new_scale.reshape(())
                elif new_scale.size != data.size:
                    notes.append(f"{node.name}: bias has {data.size} values for {new_scale.size} scales; kept")
                    continue
                bias_axis = data.ndim - 1 if new_scale.size > 1 else 0
                new_q = quantize(values, new_scale, np.zeros(new_scale.shape, np.int32), np.int32,  # type: ignore[arg-type]
                                 axis=bias_axis)
                numerics = True
                if new_scale.size > 1:
                    dq.attrs["axis"] = bias_axis
                else:
                    dq.attrs.pop("axis", None)
            edits.set(dq, 0, new_q)
            edits.set(dq, 1, new_scale)
            zp = np.zeros(new_scale.shape, np.int32)
            if len(dq.inputs) > 2 and not dq.inputs[2].is_empty():
                edits.set(dq, 2, zp)
            else:
                dq.inputs.append(gs.Constant(edits.names(f"{dq.inputs[0].name}_zero_point"), zp))
            changes += 1
        edits.commit()
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=numerics, notes=notes)


def _bcast(zp: np.ndarray, rank: int, axis: int) -> np.ndarray:
    zp = np.asarray(zp, np.int64)
    if zp.ndim == 0 or rank == 0:
        return zp
    shape = [1] * rank
    shape[axis % rank] = -1
    return zp.reshape(shape)


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    if got.size not in (1, want.size) or want.size not in (1, got.size):
        return False
    a, b = np.broadcast_arrays(got, want)
    return bool(np.allclose(a, b, rtol=_RTOL, atol=0))
