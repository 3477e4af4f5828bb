"""Facts of the 8-bit QDQ format TIDL imports: which ops carry quantization, power-of-two scales, and TIDL's
per-layer quantization table.

The power-of-two test and rounding are shared by validator rule TIDL020, the fix pass that enforces power-of-two
scales and the snippet generator's choice of scale type, so the three always agree.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "FUSED_INTO_NEXT",
    "NEEDS_QDQ",
    "PASS_THROUGH",
    "PER_TENSOR_WEIGHT_OPS",
    "QDQ_OPS",
    "SYMMETRIC_INPUT_OPS",
    "is_power_of_two",
    "round_to_power_of_two",
]

QDQ_OPS: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear"})
"""The ONNX ops that carry quantization parameters in a QDQ model."""


def is_power_of_two(scale: np.ndarray) -> np.ndarray:
    """Elementwise: is each (positive, finite) scale exactly ``2**k`` for an integer k.

    TDA4VM (MMAv1) takes power-of-2 scales only (``quantization_scale_type: 1``; shared TIDL notes §1, §4).
    """
    s = np.asarray(scale, dtype=np.float64)
    mant, _ = np.frexp(s)
    return np.isfinite(s) & (s > 0) & (mant == 0.5)


def round_to_power_of_two(scale: np.ndarray, mode: Literal["ceil", "nearest"] = "ceil") -> np.ndarray:
    """Round positive scales to powers of two: up (``ceil``: TI's wrapper, ``2 ** ceil(log2 s)``, ranges only grow)
    or to the nearest in log2 (``nearest``: AMD Quark / vai_q_onnx, can clip by up to sqrt(2)); shared TIDL notes
    §2 "Power-of-2". Returns float32."""
    s = np.asarray(scale, dtype=np.float64)
    mant, exp = np.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    k = np.where(mant == 0.5, exp - 1, exp) if mode == "ceil" else np.rint(np.log2(s)).astype(np.int64)
    return np.ldexp(1.0, k.astype(np.int64)).astype(np.float32)


# TIDL's per-layer quantization table (sources.LAYER_QUANT_TABLE: the 11.2-era docs/quantization.md, "TIDL Layer
# Quantization Restrictions"; no earlier release documents it, and it is applied to every release as the best
# statement of what TIDL's layers do with quantization).

PER_TENSOR_WEIGHT_OPS: frozenset[str] = frozenset({"ConvTranspose", "DeformConv", "BatchNormalization", "PRelu"})
"""Layers whose weights (slopes) are symmetric per-tensor: Deconv2D, DeformableConv, BatchNorm, PReLU rows."""

SYMMETRIC_INPUT_OPS: frozenset[str] = frozenset({
    "ConvTranspose", "DeformConv", "BatchNormalization", "PRelu", "Mul", "Sub", "Div", "Max", "Min", "Sum",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "Resize", "Upsample", "Sigmoid", "Tanh",
    "Gather", "ArgMax", "DepthToSpace", "Split", "Slice", "Pad", "Squeeze", "ReduceMax", "ReduceMin", "ReduceMean",
    "ScatterElements", "GridSample", "TopK",
})
"""Layers whose activations the table gives as symmetric (EltWise: asymmetric "only for Add")."""

NEEDS_QDQ: frozenset[str] = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "DeformConv", "BatchNormalization", "PRelu",
    "Add", "Mul", "Sub", "Div", "Max", "Min", "Sum", "Concat", "Softmax", "LayerNormalization",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Resize", "Upsample", "Sigmoid", "Tanh",
    "Gather", "ArgMax", "DepthToSpace", "SpaceToDepth", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
})
"""Layers with "Requires QDQ Nodes: Yes" (the activation functions TIDL maps to its BatchNorm layer included)."""

PASS_THROUGH: frozenset[str] = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Pad", "Identity", "Dropout",
})
"""Layers with "Requires QDQ Nodes: No": quantization passes through them."""

FUSED_INTO_NEXT: dict[str, frozenset[str]] = {
    "Conv": frozenset({"Relu", "BatchNormalization", "Clip", "LeakyRelu"}),
    "ConvTranspose": frozenset({"Relu", "BatchNormalization", "Clip"}),
    "Gemm": frozenset({"Relu", "Clip"}),
    "MatMul": frozenset({"Add", "Relu"}),
    "Add": frozenset({"Relu", "Clip"}),
    "Mul": frozenset({"Relu", "Clip"}),
    "Sub": frozenset({"Relu", "Clip"}),
    "Div": frozenset({"Relu", "Clip", "Erf"}),
    "BatchNormalization": frozenset({"Relu", "Clip"}),
}
"""The table's notes: these layers need no Q/DQ of their own when the listed consumer has it (a Relu, or a
BatchNorm after a Conv/ConvTranspose; Clip/LeakyRelu as Relu's kin, MatMul + Add as one InnerProduct, Div -> Erf
inside GELU)."""
