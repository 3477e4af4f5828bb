"""Hand-built exporter outputs for the export-pipeline pass tests: marker nodes and small graphs around them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tiexport.passes.expand_markers import MARKER_DOMAIN, MARKER_OP

__all__ = ["fake_quant", "marker", "model"]


def marker(x: str, y: str, module: str, scale: list[float], zp: list[int], axis: int = -1, qmin: int = 0,
           qmax: int = 255) -> onnx.NodeProto:
    """One ``tiexport.QuantizeDequantize`` marker, as both exporters write it."""
    return helper.make_node(MARKER_OP, [x], [y], domain=MARKER_DOMAIN, module=module, scale=scale,
                            zero_point=zp, axis=axis, quant_min=qmin, quant_max=qmax)


def model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], outputs: dict[str, list[int]],
          inits: dict[str, np.ndarray] | None = None, opset: int = 17, markers: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MARKER_DOMAIN, 1)] if markers else [])
    return helper.make_model(graph, opset_imports=opsets)


def fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """torch's fake-quant numerics: clamp(round_half_even(x / s) + z, qmin, qmax) - z, times s."""
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)
