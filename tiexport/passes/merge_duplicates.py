"""MergeDuplicateQdqPass: one QuantizeLinear/DequantizeLinear per (tensor, parameters), not several.

Exporters often emit a separate Q or DQ for every consumer of a tensor; duplicates confuse TIDL's partitioning
(tidl.md §6 item 5; validator rule TIDL031).
"""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import is_graph_output, iter_quantizers, remove_node, replace_uses

__all__ = ["MergeDuplicateQdqPass"]


class MergeDuplicateQdqPass(Pass):
    """Merge Q or DQ nodes that read the same tensor with the same parameters into the first of them (exact).

    Rewrites::

        Q(x, s, z) ; Q'(x, s, z)   -> Q(x, s, z)          users of Q' read Q's output
        DQ(q, s, z) ; DQ'(q, s, z) -> DQ(q, s, z)         users of DQ' read DQ's output

    The first node (in graph order) and its output name are kept. Skipped (with a note): a duplicate whose output
    is a graph output (its name is part of the model's interface).
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        notes: list[str] = []
        seen: dict[tuple[Any, ...], gs.Node] = {}
        for node, qp in iter_quantizers(graph):
            if len(node.outputs) != 1:
                continue
            extra = tuple(sorted((k, str(v)) for k, v in node.attrs.items() if k not in ("axis",)))
            key = (node.op, id(node.inputs[0]), qp.key(), extra, node.domain or "")
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            out = node.outputs[0]
            if is_graph_output(graph, out):
                notes.append(f"{node.name}: duplicate of {first.name} but its output {out.name!r} is a graph output")
                continue
            replace_uses(out, first.outputs[0])
            remove_node(graph, node)
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False, notes=notes)
