"""AlignConcatScalesPass: quantize every input of a Concat (and of an Add, where the device asks) on one grid.

TIDL requantizes Concat/Add inputs that arrive on different scales, which costs a layer and some accuracy
(inference in tidl.md §2 "Add/Concat inputs with different scales"; AMD's tools align Concat inputs to the largest
scale for the same reason). Validator rule TIDL032.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import (
    ConstEdits,
    QParams,
    insert_before,
    is_const,
    is_graph_output,
    is_non_negative,
    producer,
    qparams,
    qrange,
    set_qdq_params,
)

__all__ = ["AlignConcatScalesPass"]


class AlignConcatScalesPass(Pass):
    """Give the quantized inputs of Concat (and Add when ``add``) one scale and zero point.

    Rewrites::

        Concat(DQ(Q(a, s1, z)), DQ(Q(b, s2, z))) -> Concat(DQ(Q(a, s, z)), DQ(Q(b, s, z)))       s = max(s1, s2)
        Concat(DQ(Q(a, s1, z1)), DQ(Q(b, s2, z2))) -> same with (s, 0) covering both ranges (int8, or uint8 when
                                                      both ranges are non-negative)
        DQ(Q(conv, s1, 0, uint8)) -> DQ(Q(Relu(conv), s, 0, int8))   when the common grid goes below 0 and the old
                                                                     zero-floored grid was the only Relu

    Each input's QuantizeLinear and all the DequantizeLinear nodes reading it change together, so the tensor is
    quantized once, on the common grid. Ranges only grow (the largest scale wins), so nothing new clips; inputs with
    smaller ranges get a coarser grid (numerics change by at most half the new step). Skipped (with a note): an
    input that is not ``DQ(Q(x))`` per-tensor with constant parameters, or whose Q feeds other nodes.
    """

    def __init__(self, *, add: bool = False) -> None:
        self.add = add

    def __repr__(self) -> str:
        return f"{type(self).__name__}(add={self.add})"

    def run(self, graph: gs.Graph) -> PassResult:
        ops = {"Concat", "Add"} if self.add else {"Concat"}
        changes = 0
        notes: list[str] = []
        for node in list(graph.nodes):
            if node.op not in ops or len(node.inputs) < 2:
                continue
            groups = self._groups(graph, node, notes)
            if groups is None:
                continue
            params = [qp for _, _, qp in groups]
            if all(np.array_equal(p.scale, params[0].scale) and np.array_equal(p.zero_point, params[0].zero_point)
                   for p in params):
                continue
            edits = ConstEdits(graph)
            self._align(graph, groups, edits)
            edits.commit()
            changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=changes > 0, notes=notes)

    def _groups(self, graph: gs.Graph, node: gs.Node, notes: list[str]
                ) -> list[tuple[gs.Node, list[gs.Node], QParams]] | None:
        """Per input: (its QuantizeLinear, the DequantizeLinear nodes reading it, parameters); None if not alignable."""
        groups: list[tuple[gs.Node, list[gs.Node], QParams]] = []
        seen: set[int] = set()
        for inp in node.inputs:
            dq = producer(inp)
            if dq is None or dq.op != "DequantizeLinear" or is_const(dq.inputs[0]):
                return None  # not a quantized activation (validator rule TIDL032 skips these too)
            qp = qparams(dq)
            if qp is None or qp.per_channel or not qp.valid:
                return None
            q = producer(dq.inputs[0])
            why = ""
            if q is None or q.op != "QuantizeLinear":
                why = f"input {inp.name!r} is a DequantizeLinear without a QuantizeLinear before it"
            elif is_graph_output(graph, q.outputs[0]):
                why = f"{q.name}'s output is a graph output"
            else:
                dqs = list(q.outputs[0].outputs)
                qq = qparams(q)
                if qq is None or not qq.same_as(qp) or any(
                        d.op != "DequantizeLinear" or not _same(qparams(d), qp) for d in dqs):
                    why = f"{q.name} feeds nodes other than DequantizeLinear nodes with its parameters"
            if why:
                notes.append(f"{node.name}: {why}; scales not aligned")
                return None
            if id(q) not in seen:
                seen.add(id(q))
                groups.append((q, dqs, qp))
        return groups

    def _align(self, graph: gs.Graph, groups: list[tuple[gs.Node, list[gs.Node], QParams]], edits: ConstEdits) -> None:
        params = [qp for _, _, qp in groups]
        scales = [float(np.asarray(p.scale).ravel()[0]) for p in params]
        zps = [int(np.asarray(p.zero_point).ravel()[0]) for p in params]
        widest = int(np.argmax(scales))
        if len(set(zps)) == 1:
            # same zero point: the largest scale's grid contains every range, and each keeps its type
            target_scale = np.float32(scales[widest])
            for q, dqs, qp in groups:
                set_qdq_params([q, *dqs], edits, np.asarray(target_scale, np.float32).reshape(qp.scale.shape))
            return
        # different zero points: one zero-point-0 grid covering every input's range. Zero point 0 is what every
        # TIDL device takes, so EnforceSymmetricPass (graph inputs, TDA4VM activations) never undoes it.
        lows = [float(p.float_range()[0].ravel()[0]) for p in params]
        highs = [float(p.float_range()[1].ravel()[0]) for p in params]
        lo, hi = min(min(lows), 0.0), max(max(highs), 0.0)
        wide = params[widest].dtype.itemsize
        dtype = np.dtype(f"uint{8 * wide}") if lo >= 0 else np.dtype(f"int{8 * wide}")
        lo_q, hi_q = qrange(dtype)  # type: ignore[misc]
        s = max(max(scales), hi / hi_q, lo / lo_q if lo_q < 0 else 0.0)
        z = 0
        new_floor = lo_q * s
        for (q, dqs, qp), old_floor in zip(groups, lows, strict=True):
            if old_floor == 0.0 and new_floor < 0 and not is_non_negative(q.inputs[0]):
                self._make_relu_explicit(graph, q, edits)
            set_qdq_params([q, *dqs], edits, np.asarray(s, np.float32).reshape(qp.scale.shape),
                           np.asarray(z, dtype).reshape(qp.scale.shape), dtype)

    @staticmethod
    def _make_relu_explicit(graph: gs.Graph, q: gs.Node, edits: ConstEdits) -> None:
        # A grid starting at 0 clips negatives: exporters (ONNX Runtime's quantizer among them) drop a Relu into
        # it. Once the grid reaches below 0 that Relu must be a node again.
        x = q.inputs[0]
        out = gs.Variable(edits.names(f"{x.name}_relu"), dtype=x.dtype, shape=x.shape)
        relu = gs.Node("Relu", edits.names(f"{q.name}_Relu"), inputs=[x], outputs=[out])
        q.inputs[0] = out
        insert_before(graph, relu, q)


def _same(a: QParams | None, b: QParams) -> bool:
    return a is not None and a.same_as(b)
