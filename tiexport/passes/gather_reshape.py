"""FoldIdentityGatherPass: a Gather that only re-reads a flattened tensor in order becomes a Reshape (or nothing).

The dynamo exporter writes ``aten.as_strided`` that restores a tensor's own layout (timm's ConvNeXt head: the
average-pool output, [1, 320, 1, 1], after a permute and a fake-quant) as ``Reshape(x, [-1])`` followed by a
``Gather`` of the indices ``0, 1, ..., N-1`` shaped like ``x``. TIDL takes Gather only with 1-D indices from a
tensor of rank > 1 (tidl.md §3, TI's supported-ops table, TIDL068), so the layer runs on Arm and, as it sits between
the pool and its QuantizeLinear, leaves the pool without the requantization TIDL needs (TIDL014). The TorchScript
exporter writes nothing there. Part of the export and fix pipelines; exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import Names, const_value, is_graph_output, producer, replace_uses
from tiexport.passes.static_shapes import inferred_static_shapes

__all__ = ["FoldIdentityGatherPass", "static_dims"]


def static_dims(shape: Sequence[object] | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[call-overload]


class FoldIdentityGatherPass(Pass):
    """Replace an in-order Gather over a flattened tensor by a Reshape to the indices' shape (exact).

    Rewrites::

        Gather(Reshape(x, [-1] or [N]), indices=arange(N).reshape(S), axis=0)  -> Reshape(x, S)   (x if S == x.shape)

    where ``x`` has a static shape with N elements. Left alone: indices that are not a constant in order, a gather
    over part of the tensor, an ``x`` of unknown shape, and a Gather whose output is a graph output. The flattening
    Reshape stays for :class:`~tiexport.passes.dead_nodes.RemoveDeadNodesPass` when nothing else reads it.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        inferred: dict[str, tuple[int, ...]] | None = None
        for node in list(graph.nodes):
            if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            if int(node.attrs.get("axis", 0)) != 0 or is_graph_output(graph, node.outputs[0]):
                continue
            flat = producer(node.inputs[0])
            indices = const_value(node.inputs[1])
            if flat is None or flat.op != "Reshape" or indices is None or indices.dtype.kind not in "iu":
                continue
            x = flat.inputs[0]
            target = const_value(flat.inputs[1]) if len(flat.inputs) > 1 else None
            shape = static_dims(x.shape)
            if shape is None and target is not None:
                if inferred is None:
                    inferred = inferred_static_shapes(graph)
                shape = inferred.get(x.name)
            if shape is None or target is None or target.size != 1:
                continue
            n = int(np.prod(shape, dtype=np.int64))
            if int(target.ravel()[0]) not in (-1, n) or indices.size != n:
                continue
            if not np.array_equal(indices.ravel(), np.arange(n)):
                continue
            out = node.outputs[0]
            if tuple(indices.shape) == shape:
                replace_uses(out, x)
                node.inputs.clear()
                node.outputs.clear()
                graph.nodes.remove(node)
            else:
                new_shape = gs.Constant(Names(graph)(f"{node.name}_shape"), np.asarray(indices.shape, dtype=np.int64))
                node.op = "Reshape"
                node.attrs.clear()
                node.inputs.clear()
                node.inputs.extend([x, new_shape])
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
