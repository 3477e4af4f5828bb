"""ScalarGatherToSlicePass: ``x[:, i]`` as a one-element Slice and a Squeeze instead of a scalar-index Gather.

``x[:, i]`` (a ViT's class token, ``x[:, 0]``) exports as a Gather with a scalar index, which TIDL does not take (1-D
indices only: TI's supported-ops table, edgeai-tidl-tools rel_11_00 docs/supported_ops_rts_versions.md L38, TIDL068),
so it runs on Arm. The same values come out of a Slice of one element along that axis and a Squeeze of it, both TIDL
layers (L23 and L33). Part of the export and fix pipelines; exact.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.gather_reshape import static_dims
from tiexport.passes.graph import Names, const_value
from tiexport.passes.static_shapes import inferred_ranks, inferred_static_shapes

__all__ = ["ScalarGatherToSlicePass"]


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
        names = Names(graph)
        for node, i in candidates:
            x = node.inputs[0]
            rank = ranks.get(x.name)
            if rank is None or rank < 1:
                continue
            axis = int(node.attrs.get("axis", 0)) % rank
            if i < 0:
                if shapes is None:
                    shapes = inferred_static_shapes(graph)
                shape = static_dims(x.shape) or shapes.get(x.name)
                if shape is None:
                    continue
                i += shape[axis]
            sliced = gs.Variable(names(f"{node.name}_slice_out"), dtype=x.dtype)
            slice_node = gs.Node("Slice", names(f"{node.name}_slice"), inputs=[
                x, gs.Constant(names(f"{node.name}_starts"), np.array([i], np.int64)),
                gs.Constant(names(f"{node.name}_ends"), np.array([i + 1], np.int64)),
                gs.Constant(names(f"{node.name}_axes"), np.array([axis], np.int64))], outputs=[sliced])
            node.op = "Squeeze"
            node.attrs.clear()
            node.inputs.clear()
            if opset >= 13:
                axes = gs.Constant(names(f"{node.name}_squeeze_axes"), np.array([axis], np.int64))
                node.inputs.extend([sliced, axes])
            else:
                node.inputs.append(sliced)
                node.attrs["axes"] = [axis]
            graph.nodes.insert(graph.nodes.index(node), slice_node)
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
