"""Facts of the 8-bit QDQ format TIDL imports: which ops carry quantization, integer ranges, power-of-two scales.

The power-of-two test and rounding are shared by validator rule TIDL020, the fix pass that enforces power-of-two
scales and the snippet generator's choice of scale type, so the three always agree.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["QDQ_OPS", "is_power_of_two", "round_to_power_of_two"]

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
