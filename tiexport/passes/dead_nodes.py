"""RemoveDeadNodesPass: drop nodes whose results never reach a graph output.

Dead Q/DQ nodes are flagged by validator rule TIDL031 ("result is never used"); any dead node is wasted work for
TIDL's importer and ONNX Runtime alike.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult

__all__ = ["RemoveDeadNodesPass"]


class RemoveDeadNodesPass(Pass):
    """Remove nodes that do not contribute to any graph output (exact).

    Rewrites::

        DQ(x) with no users         -> (removed)
        f(x) not reaching outputs   -> (removed)        any op, transitively

    Graph inputs are kept even when unused: they are part of the model's interface. Unused initializers go with
    the nodes that read them.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        before = {id(n) for n in graph.nodes}
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        removed = len(before - {id(n) for n in graph.nodes})
        return PassResult(graph, modified=removed > 0, changes=removed, numerics_changed=False)
