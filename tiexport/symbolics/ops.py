"""The one torch op every quantized model is lowered to before export: ``tiexport::quantize_dequantize``.

Why a custom op instead of torch's own fake-quant ops: torch's ops take their scale and zero point as *tensors* that
the exporters see as run-time values (the TorchScript exporter has no symbolic for
``aten::fused_moving_avg_obs_fake_quant``; the dynamo exporter fails on
``_fake_quantize_per_tensor_affine_cachemask_tensor_qparams``; observers left enabled trace into in-place copies —
tidl.md §6 item 3). ``tiexport::quantize_dequantize`` carries the frozen quantization parameters as plain Python
numbers plus the name of the module the site belongs to, so each exporter's translation (``tiexport.symbolics.qdq``)
can write them as constants of QuantizeLinear/DequantizeLinear nodes named after that module — what TIDL's
prequantized import reads (tidl.md §2).

Eager semantics are torch's fake-quant semantics (``torch.fake_quantize_per_{tensor,channel}_affine``): clamp to
``[quant_min, quant_max]``, round half to even. The op is defined once per process in the ``tiexport`` namespace
(a torch.library definition cannot be undefined; the namespace is ours alone); the exporter registrations that
translate it are scoped to each export call (``tiexport.symbolics.registry``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tiexport.symbolics.names import OP_NAME, OP_NAMESPACE

__all__ = ["OP_NAME", "OP_NAMESPACE", "QSpec", "qdq", "quantize_dequantize"]


@dataclass(frozen=True)
class QSpec:
    """Frozen quantization parameters of one fake-quant site.

    ``scale``/``zero_point`` have one entry per tensor (``axis is None``) or one per channel along ``axis``.
    ``quant_min``/``quant_max`` are the integer range the values are clamped to; the ONNX integer type is the
    smallest 8-bit type holding it (uint8 when ``quant_min >= 0``, else int8).
    """

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    quant_min: int
    quant_max: int
    axis: int | None = None

    def __post_init__(self) -> None:
        if not self.scale or len(self.scale) != len(self.zero_point):
            raise ValueError(f"scale and zero point must be non-empty and of one length: {self.scale} "
                             f"{self.zero_point}")
        if self.axis is None and len(self.scale) != 1:
            raise ValueError("a per-tensor QSpec has exactly one scale")
        if self.quant_min >= self.quant_max:
            raise ValueError(f"quant_min {self.quant_min} must be below quant_max {self.quant_max}")

    @property
    def signed(self) -> bool:
        return self.quant_min < 0

    @property
    def levels(self) -> int:
        return self.quant_max - self.quant_min + 1

    @property
    def bits(self) -> int:
        """Bits needed for the integer range (8 for [-128, 127], 4 for [-8, 7], 7 for [0, 127])."""
        return max(1, math.ceil(math.log2(self.levels)))

    @property
    def fits_8bit(self) -> bool:
        """The range fits int8 (signed) or uint8 (unsigned); wider ranges cannot be written as 8-bit Q/DQ."""
        return (self.quant_min >= -128 and self.quant_max <= 127) or (self.quant_min >= 0 and self.quant_max <= 255)

    @property
    def full_range(self) -> bool:
        """The range is the whole int8/uint8 range: no Clip needed, QuantizeLinear saturates there itself."""
        return (self.quant_min, self.quant_max) in ((-128, 127), (0, 255))

    @property
    def dtype_range(self) -> tuple[int, int]:
        return (-128, 127) if self.signed else (0, 255)

    def describe(self) -> str:
        kind = "per-tensor" if self.axis is None else f"per-channel (axis {self.axis})"
        return f"{kind} [{self.quant_min}, {self.quant_max}]"


@torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: Sequence[float], zero_point: Sequence[int], axis: int, quant_min: int, quant_max: int,
    name: str,
) -> torch.Tensor:
    """Fake-quantize ``x`` with frozen parameters (torch's fake-quant numerics).

    ``axis == -1``: per tensor (one scale); otherwise per channel along that (non-negative) axis. ``name`` is the
    qualified name of the module the site belongs to; the exporters write it into the Q/DQ node names.
    """
    if axis < 0:
        return torch.fake_quantize_per_tensor_affine(x, float(scale[0]), int(zero_point[0]), quant_min, quant_max)
    s = torch.tensor(list(scale), dtype=torch.float32, device=x.device)
    z = torch.tensor(list(zero_point), dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, s, z, axis, quant_min, quant_max)


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: Sequence[float], zero_point: Sequence[int], axis: int, quant_min: int, quant_max: int,
      name: str) -> torch.Tensor:
    return torch.empty_like(x)


def qdq(x: torch.Tensor, spec: QSpec, name: str) -> torch.Tensor:
    """Fake-quantize ``x`` through the custom op, so that both exporters see one op per quantization site."""
    axis = -1
    if spec.axis is not None:
        axis = spec.axis if spec.axis >= 0 else spec.axis + x.dim()
    return torch.ops.tiexport.quantize_dequantize(
        x, [float(s) for s in spec.scale], [int(z) for z in spec.zero_point], axis, spec.quant_min, spec.quant_max,
        name)
