"""EnforcePowerOfTwoScalesPass: every Q/DQ scale an exact power of two, for devices that require it.

TDA4VM (MMAv1) takes power-of-2 scales only (tidl.md §1, ``quantization_scale_type: 1``). TI's wrapper rounds up,
``2 ** ceil(log2(s))``, so ranges only grow and nothing clips; AMD Quark/vai_q_onnx round log2 to nearest, which can
clip by up to sqrt(2) (tidl.md §2 "Power-of-2"). Validator rule TIDL020.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.errors import UsageError
from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import ConstEdits, const_value, dequantize, is_const, iter_quantizers, quantize
from tiexport.tidl_spec import is_power_of_two, round_to_power_of_two

__all__ = ["EnforcePowerOfTwoScalesPass"]

Mode = Literal["ceil", "nearest"]


class EnforcePowerOfTwoScalesPass(Pass):
    """Round every QuantizeLinear/DequantizeLinear scale to a power of two; requantize constant weights and biases.

    Rewrites::

        DQ(Q(x, s, z), s, z) -> DQ(Q(x, p2(s), z), p2(s), z)          activations: zero points kept
        DQ(w_q, s, z)        -> DQ(round((w_q - z) s / p2(s)) + z, p2(s), z)     weights and int32 biases

    ``p2(s) = 2 ** ceil(log2 s)`` (``mode="ceil"``, default) or ``2 ** round(log2 s)`` (``mode="nearest"``).
    Zero points stay as they are, so a grid that started at 0 (an absorbed Relu) still starts at 0 and a
    QuantizeLinear and its DequantizeLinear stay consistent. Numerics change by at most half a step of ``p2(s)``
    per quantized tensor. Scales that are already powers of two and invalid scales (<= 0, NaN) are left alone.
    """

    def __init__(self, mode: Mode = "ceil") -> None:
        if mode not in ("ceil", "nearest"):
            raise UsageError(f"power-of-two rounding must be 'ceil' or 'nearest', not {mode!r}")
        self.mode: Mode = mode

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"

    def run(self, graph: gs.Graph) -> PassResult:
        edits = ConstEdits(graph)
        changes = 0
        for node, qp in iter_quantizers(graph):
            if not qp.valid or bool(np.all(is_power_of_two(qp.scale))):
                continue
            new_scale = round_to_power_of_two(qp.scale, self.mode).reshape(qp.scale.shape)
            edits.set(node, 1, new_scale)
            if node.op == "DequantizeLinear" and is_const(node.inputs[0]):
                data = const_value(node.inputs[0])
                if data is not None and data.dtype.kind in "iu":
                    axis = qp.axis if qp.per_channel else 0
                    w = dequantize(data, qp.scale, qp.zero_point, axis=axis)
                    edits.set(node, 0, quantize(w, new_scale, qp.zero_point, data.dtype, axis=axis))
            changes += 1
        edits.commit()
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=changes > 0)
