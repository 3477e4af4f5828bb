"""SplitQkvBeforeHeadsPass: attention's q, k, v split from the qkv projection before it is cut into heads.

timm's ``Attention`` (every timm ViT, DeiT, and most ViT code since) computes
``qkv(x).reshape(B, N, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)``: q, k and v come out of the first axis of
a 5-D ``[3, B, heads, N, dim]`` tensor. TIDL's Slice/Split takes an input of at most 4 dimensions with batch 1 (TI's
supported-ops table, edgeai-tidl-tools rel_11_00 docs/supported_ops_rts_versions.md L23, TIDL058), so that Split
runs on Arm, once per block. The same values come from splitting the ``[B, N, 3 * heads * dim]`` projection along its
last axis (three Slices) and cutting each third into heads (Reshape to ``[B, N, heads, dim]``, Transpose
``0, 2, 1, 3``), all 3-D and 4-D. Part of the export and fix pipelines; exact (data movement only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import Names, const_value, consumers, is_graph_output, producer, qparams
from tiexport.passes.static_shapes import inferred_static_shapes

__all__ = ["SplitQkvBeforeHeadsPass"]

_HEADS_PERM = [2, 0, 3, 1, 4]


def _through_qdq(t: gs.Tensor, chain: list[gs.Node]) -> gs.Tensor:
    """Walk up from ``t`` through one QuantizeLinear -> DequantizeLinear pair, if there is one (recorded in
    ``chain``)."""
    dq = producer(t)
    if dq is None or dq.op != "DequantizeLinear":
        return t
    q = producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        return t
    chain.extend([dq, q])
    return q.inputs[0]


def _static(shape: Sequence[object] | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[call-overload]


class SplitQkvBeforeHeadsPass(Pass):
    """Rewrite the 5-D q/k/v unbind of attention into 3-D Slices and per-part Reshape + Transpose (exact).

    Rewrites (each arrow may carry one Q/DQ pair, all with the same parameters, as a shared fake-quant exports)::

        x[B, N, 3*H*D] -> Reshape[B, N, 3, H, D] -> Transpose(2, 0, 3, 1, 4) -> Split(axis 0) or 3 x Slice(axis 0)
                       -> Squeeze(0) each -> q, k, v
        x -> Slice(axis 2, [i*H*D, (i+1)*H*D]) -> Reshape[B, N, H, D] -> Transpose(0, 2, 1, 3), i = 0, 1, 2

    Left alone: other permutations, shapes that are not static, parts read by anything but their Squeeze, chain
    tensors with other readers or that are graph outputs, and Q/DQ pairs along the chain with different parameters.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        splits = [n for n in graph.nodes if n.op in ("Split", "Slice") and (n.domain or "") in ("", "ai.onnx")]
        if not splits:
            return PassResult(graph, modified=False)
        shapes: dict[str, tuple[int, ...]] = {}
        inferred = False
        names = Names(graph)
        changes = 0
        seen: set[int] = set()
        for node in splits:
            data = node.inputs[0] if node.inputs else None
            if data is None or id(data) in seen or node not in graph.nodes:
                continue
            seen.add(id(data))
            chain = self._match(data)
            if chain is None:
                continue
            if not inferred:  # shape inference only once something has the pattern's structure
                shapes, inferred = inferred_static_shapes(graph), True
            if self._rewrite(graph, chain, shapes, names):
                changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)

    def _match(self, data: gs.Tensor) -> tuple[gs.Tensor, list[tuple[int, gs.Node]], list[gs.Node]] | None:
        """(``data``, its parts with their Squeeze, the chain up to the Reshape) when the graph around ``data`` has
        the pattern's structure (shapes are checked by :meth:`_rewrite`)."""
        parts = self._parts(data)
        if parts is None:
            return None
        chain: list[gs.Node] = []
        transpose = producer(_through_qdq(data, chain))
        if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != _HEADS_PERM:
            return None
        chain.append(transpose)
        reshape = producer(_through_qdq(transpose.inputs[0], chain))
        if reshape is None or reshape.op != "Reshape":
            return None
        chain.append(reshape)
        return data, parts, chain

    def _rewrite(self, graph: gs.Graph, match: tuple[gs.Tensor, list[tuple[int, gs.Node]], list[gs.Node]],
                 shapes: dict[str, tuple[int, ...]], names: Names) -> bool:
        data, parts, chain = match
        reshape = chain[-1]
        r_out = reshape.outputs[0]
        x = reshape.inputs[0]
        x_shape = _static(x.shape) or shapes.get(x.name)
        five = _static(r_out.shape) or shapes.get(r_out.name)
        if x_shape is None or five is None or len(x_shape) != 3 or len(five) != 5:
            return False
        b, n, three, heads, dim = five
        if three != 3 or x_shape != (b, n, 3 * heads * dim):
            return False
        # every tensor of the chain is read only by the next node of the chain, and none is a graph output
        tensors = [o for c in chain for o in c.outputs]
        if any(is_graph_output(graph, t) for t in tensors) or any(
                len(consumers(t)) != 1 for t in tensors if t is not data):
            return False
        found = [qparams(c) for c in chain if c.op in ("QuantizeLinear", "DequantizeLinear")]
        params = [p for p in found if p is not None]
        if len(params) != len(found) or any(not p.same_as(params[0]) for p in params[1:]):
            return False
        width = heads * dim
        split_out = [gs.Variable(names(f"{x.name}_qkv{i}"), dtype=x.dtype, shape=[b, n, width]) for i in range(3)]
        # three Slices rather than one Split: Split changed signature in opset 18 and ONNX's converter has no
        # adapter back to 17, which the dynamo export (opset 18) goes through after this pass
        last = gs.Constant(names(f"{reshape.name}_qkv_axis"), np.array([2], np.int64))
        new_nodes = [gs.Node("Slice", names(f"{reshape.name}_qkv{i}_slice"), inputs=[
            x, gs.Constant(names(f"{reshape.name}_qkv{i}_start"), np.array([i * width], np.int64)),
            gs.Constant(names(f"{reshape.name}_qkv{i}_end"), np.array([(i + 1) * width], np.int64)), last],
            outputs=[split_out[i]]) for i in range(3)]
        head_shape = gs.Constant(names(f"{reshape.name}_head_shape"), np.array([b, n, heads, dim], np.int64))
        for i, (_, squeeze) in enumerate(parts):
            heads_t = gs.Variable(names(f"{x.name}_qkv{i}_heads"), dtype=x.dtype, shape=[b, n, heads, dim])
            new_nodes.append(gs.Node("Reshape", names(f"{reshape.name}_qkv{i}_reshape"),
                                     inputs=[split_out[i], head_shape], outputs=[heads_t]))
            out = squeeze.outputs[0]
            new_nodes.append(gs.Node("Transpose", names(f"{reshape.name}_qkv{i}_transpose"),
                                     attrs={"perm": [0, 2, 1, 3]}, inputs=[heads_t], outputs=[out]))
            squeeze.outputs.clear()  # the Transpose writes q, k or v now; the Squeeze and the old chain are dead
        anchor = graph.nodes.index(reshape)
        for k, new in enumerate(new_nodes):
            graph.nodes.insert(anchor + k, new)
        return True

    @staticmethod
    def _parts(data: gs.Tensor) -> list[tuple[int, gs.Node]] | None:
        """[(index, Squeeze)] for a 3-way split of ``data`` along axis 0 into single elements, each read only by a
        Squeeze of axis 0 (a Split, or three Slices); None otherwise."""
        readers = consumers(data)
        pieces: list[tuple[int, gs.Tensor]] = []
        if len(readers) == 1 and readers[0].op == "Split":
            split = readers[0]
            sizes = const_value(split.inputs[1]) if len(split.inputs) > 1 else None
            if int(split.attrs.get("axis", 0)) != 0 or len(split.outputs) != 3 or (
                    sizes is not None and sizes.ravel().tolist() != [1, 1, 1]):
                return None
            pieces = list(enumerate(split.outputs))
        elif len(readers) == 3 and all(r.op == "Slice" for r in readers):
            for r in readers:
                starts, ends = (const_value(r.inputs[k]) if len(r.inputs) > k else None for k in (1, 2))
                axes = const_value(r.inputs[3]) if len(r.inputs) > 3 else np.array([0])
                steps = const_value(r.inputs[4]) if len(r.inputs) > 4 else np.array([1])
                if starts is None or ends is None or axes is None or steps is None or starts.size != 1 \
                        or int(axes.ravel()[0]) != 0 or int(steps.ravel()[0]) != 1 \
                        or int(ends.ravel()[0]) != int(starts.ravel()[0]) + 1:
                    return None
                pieces.append((int(starts.ravel()[0]), r.outputs[0]))
            if sorted(i for i, _ in pieces) != [0, 1, 2]:
                return None
        else:
            return None
        parts = []
        for i, t in pieces:
            users = consumers(t)
            if len(users) != 1 or users[0].op != "Squeeze":
                return None
            squeeze = users[0]
            axes = (const_value(squeeze.inputs[1]) if len(squeeze.inputs) > 1
                    else np.asarray(squeeze.attrs.get("axes", [])))
            if axes is None or axes.ravel().tolist() != [0]:
                return None
            parts.append((i, squeeze))
        return sorted(parts, key=lambda p: p[0])
