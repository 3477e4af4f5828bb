"""ConvertPerChannelToPerTensorPass: requantize per-channel weights with one scale for devices that need it.

TDA4VM (MMAv1) takes per-tensor weights only (tidl.md §1; a per-channel model fails there with "Bad node spec ...
DequantizeLinear"), and ConvTranspose, DeformConv, BatchNormalization and PRelu take per-tensor weights on every
device (tidl.md §2 table; ``TidlSpec.per_tensor_weight_ops``, which the fix pipeline passes as ``ops``). Validator
rule TIDL022.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import ConstEdits, const_value, dequantize, is_const, qparams, qrange, quantize

__all__ = ["ConvertPerChannelToPerTensorPass"]


class ConvertPerChannelToPerTensorPass(Pass):
    """Replace a per-channel weight DequantizeLinear by a per-tensor one covering every channel's range.

    Rewrites::

        DQ(w_q, s[c], z[c], axis) -> DQ(w_q, s, z)               all channels share s and z (exact)
        DQ(w_q, s[c], 0, axis)    -> DQ(w_q', s', 0)              s' = max_c |w_c| / qmax, w_q' = round(w / s')

    The new scale covers the largest channel range, so nothing clips; channels with smaller ranges get a coarser
    grid (numerics change by at most half a step of ``s'`` per weight). ``ops``: only weights feeding these op types
    (None: every weight). int32 bias DequantizeLinear nodes are left to AlignBiasScalePass.
    """

    def __init__(self, ops: Iterable[str] | None = None) -> None:
        self.ops = None if ops is None else frozenset(ops)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ops={sorted(self.ops) if self.ops is not None else None})"

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        numerics = False
        notes: list[str] = []
        edits = ConstEdits(graph)
        for node in graph.nodes:
            if node.op != "DequantizeLinear" or not is_const(node.inputs[0]):
                continue
            qp = qparams(node)
            if qp is None or not qp.per_channel or not qp.valid or qp.dtype == np.dtype(np.int32):
                continue
            if self.ops is not None and not any(c.op in self.ops for c in node.outputs[0].outputs):
                continue
            data = const_value(node.inputs[0])
            if data is None:
                continue
            lo_q, hi_q = qrange(qp.dtype)  # type: ignore[misc]
            if np.all(qp.scale == qp.scale.ravel()[0]) and np.all(qp.zero_point == qp.zero_point.ravel()[0]):
                new_scale = np.asarray(qp.scale.ravel()[0], np.float32)
                new_zp = np.asarray(qp.zero_point.ravel()[0], qp.zero_point.dtype)
                new_q = data
            else:
                if not -data.ndim <= qp.axis < data.ndim:
                    notes.append(f"{node.name}: axis {qp.axis} out of range; kept per-channel")
                    continue
                w = dequantize(data, qp.scale, qp.zero_point, axis=qp.axis).astype(np.float64)
                if qp.symmetric:
                    # symmetric weights use [-127, 127] (int8), as TI's and ONNX Runtime's weight quantizers do
                    s = float(np.abs(w).max(initial=0.0)) / hi_q
                    z = 0
                else:
                    lo = min(float(w.min()), 0.0)
                    hi = max(float(w.max()), 0.0)
                    s = (hi - lo) / (hi_q - lo_q)
                    z = int(np.clip(np.rint(lo_q - lo / s), lo_q, hi_q)) if s > 0 else 0
                if not s > 0:
                    s = float(np.max(qp.scale))
                new_scale = np.asarray(s, np.float32)
                new_zp = np.asarray(z, qp.zero_point.dtype)
                new_q = quantize(w, new_scale, new_zp, qp.dtype, axis=0)
                numerics = True
            node.attrs.pop("axis", None)
            edits.set(node, 0, new_q)
            edits.set(node, 1, new_scale)
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                edits.set(node, 2, new_zp)
            changes += 1
        edits.commit()
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=numerics, notes=notes)
