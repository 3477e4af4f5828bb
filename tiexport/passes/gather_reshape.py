"""Gathers TIDL runs on Arm, rewritten exactly into layers it runs.

FoldIdentityGatherPass: a Gather that only re-reads a flattened tensor in order becomes a Reshape (or nothing).

The dynamo exporter writes ``aten.as_strided`` that restores a tensor's own layout (timm's ConvNeXt head: the
average-pool output, [1, 320, 1, 1], after a permute and a fake-quant) as ``Reshape(x, [-1])`` followed by a
``Gather`` of the indices ``0, 1, ..., N-1`` shaped like ``x``. TIDL takes Gather only with 1-D indices from a
tensor of rank > 1 (tidl.md §3, TI's supported-ops table, TIDL068), so the layer runs on Arm and, as it sits between
the pool and its QuantizeLinear, leaves the pool without the requantization TIDL needs (TIDL014). The TorchScript
exporter writes nothing there.

ScalarGatherToSlicePass: ``x[:, i]`` (a ViT's class token, ``x[:, 0]``) exports as a Gather with a scalar index, which
TIDL does not take (1-D indices only, TIDL068); the same values come out of a Slice of one element along that axis
and a Squeeze of it, both TIDL layers (TI's supported-ops table, rel_11_00 L23 and L33).

Both are in the export and the fix pipelines; both are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import const_value, is_graph_output, producer, replace_uses
from tiexport.passes.static_shapes import inferred_ranks, inferred_static_shapes

__all__ = ["FoldIdentityGatherPass", "ScalarGatherToSlicePass"]


def _static(shape: Sequence[object] | None) -> tuple[int, ...] | None:
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
            shape = _static(x.shape)
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
                new_shape = gs.Constant(f"{node.name}_shape", np.asarray(indices.shape, dtype=np.int64))
                node.op = "Reshape"
                node.attrs.clear()
                node.inputs.clear()
                node.inputs.extend([x, new_shape])
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)


class ScalarGatherToSlicePass(Pass):
    """Replace a Gather with one constant scalar index by a one-element Slice and a Squeeze (exact).

    Rewrites::

        Gather(x, i (a scalar), axis=a)  ->  Squeeze(Slice(x, starts=[i], ends=[i + 1], axes=[a]), axes=[a])

    A negative ``i`` is counted from the end of the axis, which must then have a known size. Left alone: indices
    that are not one constant integer, an ``x`` of unknown rank, and index -1 on an axis of unknown size.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        candidates = []
        for node in graph.nodes:
            if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            index = const_value(node.inputs[1])
            if index is not None and index.ndim == 0 and index.dtype.kind in "iu":
                candidates.append((node, int(index)))
        if not candidates:
            return PassResult(graph, modified=False)
        ranks = inferred_ranks(graph)
        shapes: dict[str, tuple[int, ...]] | None = None
        changes = 0
        opset = int(graph.opset)
        for node, i in candidates:
            x = node.inputs[0]
            rank = ranks.get(x.name)
            if rank is None or rank < 1:
                continue
            axis = int(node.attrs.get("axis", 0)) % rank
            if i < 0:
                if shapes is None:
                    shapes = inferred_static_shapes(graph)
                shape = _static(x.shape) or shapes.get(x.name)
                if shape is None:
                    continue
                i += shape[axis]
            sliced = gs.Variable(f"{node.name}_slice_out", dtype=x.dtype)
            slice_node = gs.Node("Slice", f"{node.name}_slice", inputs=[
                x, gs.Constant(f"{node.name}_starts", np.array([i], np.int64)),
                gs.Constant(f"{node.name}_ends", np.array([i + 1], np.int64)),
                gs.Constant(f"{node.name}_axes", np.array([axis], np.int64))], outputs=[sliced])
            node.op = "Squeeze"
            node.attrs.clear()
            node.inputs.clear()
            if opset >= 13:
                node.inputs.extend([sliced, gs.Constant(f"{node.name}_squeeze_axes", np.array([axis], np.int64))])
            else:
                node.inputs.append(sliced)
                node.attrs["axes"] = [axis]
            graph.nodes.insert(graph.nodes.index(node), slice_node)
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
