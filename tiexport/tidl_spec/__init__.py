"""TIDL facts as data: what TIDL's prequantized (QDQ) import takes, one place for rules and passes alike.

- :mod:`~tiexport.tidl_spec.spec`: :class:`TidlSpec`, the facts of one TIDL SDK release (operator tables, the op
  sets the quantization rules name, opset/IR and compile limits), looked up with :func:`get_spec`: the SDK version
  is a parameter, and every fact cites where it comes from;
- :mod:`~tiexport.tidl_spec.quant`: facts of the quantization format itself (which ops are Q/DQ, the integer
  ranges, the exact power-of-two test and TI's power-of-two rounding).

Validator rules read a device's facts as ``device.spec`` (:class:`~tiexport.devices.DeviceProfile`); the fix
pipeline hands them to its passes. Nothing here imports anything above it (no onnx, no torch).
"""

from __future__ import annotations

from tiexport.tidl_spec.quant import QDQ_OPS, is_power_of_two, round_to_power_of_two
from tiexport.tidl_spec.spec import DEFAULT_SDK, SDK_VERSIONS, TidlSpec, get_spec

__all__ = [
    "DEFAULT_SDK",
    "QDQ_OPS",
    "SDK_VERSIONS",
    "TidlSpec",
    "get_spec",
    "is_power_of_two",
    "round_to_power_of_two",
]
