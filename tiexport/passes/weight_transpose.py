"""FoldWeightTransposePass: a Transpose of a weight's DequantizeLinear becomes a transposed int8 initializer.

The TorchScript exporter writes a linear layer on 3-D input as ``MatMul(x, Transpose(W))``; TIDL takes per-column
MatMul weights only from a constant initializer (tidl.md §2 InnerProduct row). Part of the export pipeline.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import producer, remove_node

__all__ = ["FoldWeightTransposePass"]


class FoldWeightTransposePass(Pass):
    """Transpose the stored weight instead of the dequantized tensor (exact).

    Rewrites::

        Transpose(DQ(w_q, s, z, axis=a), perm) -> DQ(transpose(w_q, perm), s, z, axis=perm.index(a))

    Only when ``w_q`` and ``s`` are initializers and the DequantizeLinear and ``w_q`` have no other reader. A
    one-element-per-channel scale without ``axis`` (default 1) gets the axis it moves to.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        for tr in list(graph.nodes):
            if tr.op != "Transpose" or not tr.inputs or not tr.outputs:
                continue
            dq = producer(tr.inputs[0])
            if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 2 or len(dq.outputs[0].outputs) != 1:
                continue
            w, scale = dq.inputs[0], dq.inputs[1]
            if not isinstance(w, gs.Constant) or len(w.outputs) != 1 or not isinstance(scale, gs.Constant):
                continue
            values = np.asarray(w.values)
            perm = [int(p) for p in tr.attrs.get("perm", list(range(values.ndim))[::-1])]
            w.values = np.ascontiguousarray(np.transpose(values, perm))
            if np.asarray(scale.values).ndim == 1:
                old_axis = int(dq.attrs.get("axis", 1)) % values.ndim
                dq.attrs["axis"] = perm.index(old_axis)
            out = tr.outputs[0]
            remove_node(graph, tr)
            dq.outputs[0] = out
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
