"""RemoveRedundantQdqPass: drop a QuantizeLinear that re-quantizes a DequantizeLinear's output to the same grid.

Each extra Q/DQ pair is an extra requantization layer for TIDL (tidl.md §6 item 5; validator rule TIDL031).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import is_graph_output, producer, qparams, remove_node, replace_uses

__all__ = ["RemoveRedundantQdqPass"]


class RemoveRedundantQdqPass(Pass):
    """Remove QuantizeLinear nodes that undo the DequantizeLinear before them (exact).

    Rewrites::

        Q(DQ(x, s, z), s, z) -> x                   same scale, zero point, type and axis
        DQ(Q(DQ(Q(x))))      -> DQ(Q(x))            chains, by the rule above
        DQ(x) with no users  -> (removed)           the DequantizeLinear the first rule leaves unused

    ``DQ(x)`` takes the values ``(x - z) * s`` exactly, so quantizing them again with the same parameters gives
    back ``x``: outputs stay bit-identical. Skipped (with a note): a QuantizeLinear whose output is a graph output.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        notes: list[str] = []
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear" or not node.inputs or not node.outputs:
                continue
            dq = producer(node.inputs[0])
            if dq is None or dq.op != "DequantizeLinear":
                continue
            a, b = qparams(dq), qparams(node)
            if a is None or b is None or not a.same_as(b):
                continue
            out = node.outputs[0]
            if is_graph_output(graph, out):
                notes.append(f"{node.name}: output {out.name!r} is a graph output; kept")
                continue
            x = dq.inputs[0]
            replace_uses(out, x)
            remove_node(graph, node)
            changes += 1
            dq_out = dq.outputs[0]
            if not dq_out.outputs and not is_graph_output(graph, dq_out):
                remove_node(graph, dq)
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False, notes=notes)
