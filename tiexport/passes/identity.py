"""RemoveIdentityPass: drop Identity and inference-mode Dropout nodes.

TIDL does not take Identity or Dropout as standalone layers (tidl.md §3, "Dropout, Identity ... not as standalone
layers"); in inference both copy their input, so removing them is exact.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import const_value, is_graph_output, remove_node, replace_uses

__all__ = ["RemoveIdentityPass"]


class RemoveIdentityPass(Pass):
    """Remove nodes that copy their input in inference (exact).

    Rewrites::

        Identity(x)                     -> x
        Dropout(x) (training_mode off)  -> x          only when its mask output is unused

    When the removed node's output is a graph output, the producer of ``x`` writes that graph output directly
    (the graph output keeps its name; ``x``'s name goes). Skipped (with a note): ``x`` is itself a graph input,
    graph output or constant, so nothing can take the output's name; Dropout in training mode or with a used mask.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        notes: list[str] = []
        for node in list(graph.nodes):
            if node.op not in ("Identity", "Dropout") or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if not node.inputs or not node.outputs:
                continue
            if node.op == "Dropout":
                reason = self._dropout_blocker(graph, node)
                if reason:
                    notes.append(f"{node.name}: {reason}; kept")
                    continue
            x, out = node.inputs[0], node.outputs[0]
            if is_graph_output(graph, out):
                src = x.inputs[0] if x.inputs else None
                if src is None or any(o is x for o in graph.inputs) or is_graph_output(graph, x) \
                        or isinstance(x, gs.Constant) or len(x.outputs) != 1:
                    notes.append(f"{node.name}: output {out.name!r} is a graph output and {x.name!r} cannot take "
                                 "its place; kept")
                    continue
                remove_node(graph, node)
                # the graph output keeps its name and type; the producer now writes it directly
                for i, t in enumerate(src.outputs):
                    if t is x:
                        src.outputs[i] = out
                changes += 1
                continue
            replace_uses(out, x)
            remove_node(graph, node)
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False, notes=notes)

    @staticmethod
    def _dropout_blocker(graph: gs.Graph, node: gs.Node) -> str:
        if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
            return "its mask output is used"
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            training = const_value(node.inputs[2])
            if training is None:
                return "training_mode is not a constant"
            if bool(np.asarray(training).ravel()[0]):
                return "training_mode is on"
        return ""
