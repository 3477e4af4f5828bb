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
from tiexport.passes.graph import QDQ_OPS, ConstEdits, const_value, dequantize, is_const, qparams, quantize

__all__ = ["EnforcePowerOfTwoScalesPass", "is_power_of_two", "power_of_two"]

Mode = Literal["ceil", "nearest"]


def is_power_of_two(scale: np.ndarray) -> np.ndarray:
    """Elementwise: is each (positive, finite) scale exactly ``2**k``."""
    s = np.asarray(scale, dtype=np.float64)
    mant, _ = np.frexp(s)
    return np.isfinite(s) & (s > 0) & (mant == 0.5)


def power_of_two(scale: np.ndarray, mode: Mode = "ceil") -> np.ndarray:
    """Round positive scales to powers of two: up (``ceil``, TI's choice) or to the nearest in log2 (``nearest``)."""
    s = np.asarray(scale, dtype=np.float64)
    mant, exp = np.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    k = np.where(mant == 0.5, exp - 1, exp) if mode == "ceil" else np.rint(np.log2(s)).astype(np.int64)
    return np.ldexp(1.0, k.astype(np.int64)).astype(np.float32)


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
        for node in graph.nodes:
            if node.op not in QDQ_OPS:
                continue
            qp = qparams(node)
            if qp is None or not qp.valid or bool(np.all(is_power_of_two(qp.scale))):
                continue
            new_scale = power_of_two(qp.scale, self.mode).reshape(qp.scale.shape)
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
