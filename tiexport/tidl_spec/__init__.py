"""TIDL facts as data: what TIDL's prequantized (QDQ) import takes, one place for rules and passes alike.

- :mod:`~tiexport.tidl_spec.spec`: :class:`TidlSpec`, the facts of one TIDL SDK release (9.2, 10.0, 10.1, 11.0:
  the operator table row by row, opset/IR ceilings, per-operator constraints that changed between releases),
  looked up with :func:`get_spec`;
- :mod:`~tiexport.tidl_spec.quant`: the quantization format (which ops are Q/DQ, the power-of-two test and TI's
  rounding) and TIDL's per-layer quantization table;
- :mod:`~tiexport.tidl_spec.sources`: the citations (repository, branch or commit, file, line) the facts and the
  validator rules rest on.

Validator rules read a device's facts as ``device.spec`` (:class:`~tiexport.devices.DeviceProfile`); the fix
pipeline hands them to its passes. Nothing here imports anything above it (no onnx, no torch).
"""

from __future__ import annotations

from tiexport.tidl_spec import sources
from tiexport.tidl_spec.quant import (
    FUSED_INTO_NEXT,
    NEEDS_QDQ,
    PASS_THROUGH,
    PER_TENSOR_WEIGHT_OPS,
    QDQ_OPS,
    SYMMETRIC_INPUT_OPS,
    is_power_of_two,
    round_to_power_of_two,
)
from tiexport.tidl_spec.sources import DocRef
from tiexport.tidl_spec.spec import DEFAULT_SDK, SDK_VERSIONS, TidlSpec, get_spec

__all__ = [
    "DEFAULT_SDK",
    "FUSED_INTO_NEXT",
    "NEEDS_QDQ",
    "PASS_THROUGH",
    "PER_TENSOR_WEIGHT_OPS",
    "QDQ_OPS",
    "SDK_VERSIONS",
    "SYMMETRIC_INPUT_OPS",
    "DocRef",
    "TidlSpec",
    "get_spec",
    "is_power_of_two",
    "round_to_power_of_two",
    "sources",
]
