"""NormalizeQdqParamsPass: one-element scales and zero points as scalars, with matching shapes and no axis.

ONNX Runtime's quantizer writes some per-tensor parameters as a ``[1]`` scale with a scalar zero point and an
``axis`` attribute; the ONNX spec wants scale and zero point of the same shape, and validator rule TIDL011 flags the
mismatch (and the axis, which is out of range for a 1-D bias). TIDL documents only scalar per-tensor parameters
and the default axis (tidl.md §2 "QuantizeLinear / DequantizeLinear").
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import ConstEdits, const_value, iter_quantizers

__all__ = ["NormalizeQdqParamsPass"]


class NormalizeQdqParamsPass(Pass):
    """Rewrite one-element Q/DQ parameters as scalars (exact).

    Rewrites::

        DQ(x, s[1], z[], axis=1) -> DQ(x, s, z)
        Q(x, s[1], z[1])         -> Q(x, s, z)

    Per-channel parameters (more than one element) are left alone.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        edits = ConstEdits(graph)
        changes = 0
        for node, qp in iter_quantizers(graph):
            if qp.scale.size != 1:
                continue
            scale = const_value(node.inputs[1])
            has_zp = len(node.inputs) > 2 and not node.inputs[2].is_empty()
            zp = const_value(node.inputs[2]) if has_zp else None
            if scale is None or (scale.ndim == 0 and (zp is None or zp.ndim == 0) and "axis" not in node.attrs):
                continue
            edits.set(node, 1, np.asarray(scale).reshape(()))
            if zp is not None:
                edits.set(node, 2, np.asarray(zp).reshape(()))
            node.attrs.pop("axis", None)
            changes += 1
        edits.commit()
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
