"""ReplaceReduceMeanWithGlobalPoolPass: a mean over every spatial axis becomes GlobalAveragePool.

The dynamo exporter writes ``adaptive_avg_pool2d(x, 1)`` as ReduceMean, which TIDL runs on Arm; GlobalAveragePool
it accelerates (tidl.md §3). Part of the export pipeline.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import const_value
from tiexport.passes.static_shapes import inferred_ranks

__all__ = ["ReplaceReduceMeanWithGlobalPoolPass"]


class ReplaceReduceMeanWithGlobalPoolPass(Pass):
    """Replace a spatial ReduceMean that keeps its dims by GlobalAveragePool (exact up to float summation order).

    Rewrites::

        ReduceMean(x[N, C, H, W], axes=[2, 3] (any order or sign), keepdims=1) -> GlobalAveragePool(x)

    Left alone: ``keepdims=0``, axes that are not exactly every axis after the channels, axes computed at run
    time, and inputs whose rank shape inference cannot tell.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        candidates = [n for n in graph.nodes if n.op == "ReduceMean" and (n.domain or "") in ("", "ai.onnx")
                      and n.inputs]
        if not candidates:
            return PassResult(graph, modified=False)
        ranks = inferred_ranks(graph)
        changes = 0
        for node in candidates:
            rank = ranks.get(node.inputs[0].name)
            if rank is None or rank < 3 or int(node.attrs.get("keepdims", 1)) != 1:
                continue
            if "axes" in node.attrs:
                axes = [int(v) for v in node.attrs["axes"]]
            elif len(node.inputs) > 1 and (value := const_value(node.inputs[1])) is not None:
                axes = [int(v) for v in value.ravel()]
            else:
                continue
            if sorted(a % rank for a in axes) != list(range(2, rank)):
                continue
            node.op = "GlobalAveragePool"
            while len(node.inputs) > 1:
                node.inputs.pop()
            node.attrs.clear()
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
