"""ClearReshapeAllowzeroPass: drop ``allowzero=1`` from a Reshape whose constant shape has no zero.

TIDL does not support Reshape's ``allowzero`` (tidl.md §3 Reshape row); with no zero in the shape it changes
nothing. Validator rule TIDL057. Part of the export pipeline.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import const_value

__all__ = ["ClearReshapeAllowzeroPass"]


class ClearReshapeAllowzeroPass(Pass):
    """Remove an ``allowzero`` attribute that cannot matter (exact).

    Rewrites::

        Reshape(x, shape, allowzero=1), shape constant without 0 -> Reshape(x, shape)
    """

    def run(self, graph: gs.Graph) -> PassResult:
        changes = 0
        for node in graph.nodes:
            if node.op != "Reshape" or len(node.inputs) < 2 or not int(node.attrs.get("allowzero", 0) or 0):
                continue
            shape = const_value(node.inputs[1])
            if shape is not None and not np.any(shape == 0):
                del node.attrs["allowzero"]
                changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)
