"""FoldWeightQuantizationPass: quantize constant weights once, offline, instead of at every inference.

TIDL's partitioner expects weights as integer initializers feeding a DequantizeLinear; a QuantizeLinear left on a
float weight confuses partitioning (tidl.md §6 item 5; validator rule TIDL030).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import const_value, is_const, is_graph_output, qparams, quantize, remove_node

__all__ = ["FoldWeightQuantizationPass"]


class FoldWeightQuantizationPass(Pass):
    """Fold QuantizeLinear of a float constant into an integer constant, bit-exact with ONNX Runtime.

    Rewrites::

        DQ(Q(w_float, s, z), s, z) -> DQ(w_int, s, z)      w_int = saturate(rint(w_float / s) + z), per axis
        Q(c_float, s, z)           -> c_int                 any QuantizeLinear of a constant (e.g. a bias)

    The integer constant takes the name of the QuantizeLinear's output, so the DequantizeLinear and every tensor
    after it keep their names. Per-tensor and per-channel (any axis) scales; int8, uint8, int16, int32.
    Skipped (with a note): a QuantizeLinear whose output is a graph output, or whose parameters are not constant.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        notes: list[str] = []
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear" or not node.inputs or not is_const(node.inputs[0]):
                continue
            data = const_value(node.inputs[0])
            if data is None or data.dtype.kind != "f":
                continue
            out = node.outputs[0]
            if is_graph_output(graph, out):
                notes.append(f"{node.name}: output {out.name!r} is a graph output; not folded")
                continue
            qp = qparams(node)
            if qp is None or not qp.valid:
                notes.append(f"{node.name}: scale/zero point not usable constants; not folded")
                continue
            axis = qp.axis if qp.per_channel else 1
            if qp.per_channel and not -data.ndim <= axis < data.ndim:
                notes.append(f"{node.name}: axis {axis} out of range; not folded")
                continue
            folded = quantize(data, qp.scale, qp.zero_point, qp.dtype, axis=axis if qp.per_channel else 0)
            const = gs.Constant(out.name, np.ascontiguousarray(folded))
            users = list(out.outputs)
            remove_node(graph, node)
            for user in users:
                for i, inp in enumerate(user.inputs):
                    if inp is out:
                        user.inputs[i] = const
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False, notes=notes)
