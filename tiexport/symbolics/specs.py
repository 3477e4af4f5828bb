"""Quantization specs (:class:`~tiexport.symbolics.ops.QSpec`) read off torch.ao's fake-quant modules and quantized
tensors: scales, zero points, integer range, per-channel axis, frozen for export."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tiexport.errors import UsageError
from tiexport.symbolics.ops import QSpec

__all__ = ["make_spec", "spec_from_fake_quant", "spec_from_qtensor"]

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_QDTYPE_RANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


def spec_from_fake_quant(fq: nn.Module, name: str) -> QSpec | None:
    """Frozen parameters of a fake-quant module, read from its attributes; None when its fake-quant is disabled."""
    enabled = getattr(fq, "fake_quant_enabled", None)
    if isinstance(enabled, torch.Tensor) and enabled.numel() and int(enabled.reshape(-1)[0]) == 0:
        return None
    scale = getattr(fq, "scale", None)
    zero_point = getattr(fq, "zero_point", None)
    if not isinstance(scale, torch.Tensor) or not isinstance(zero_point, torch.Tensor):
        raise UsageError(f"fake-quant module {name!r} ({type(fq).__name__}) has no scale/zero_point tensors")
    qscheme = getattr(fq, "qscheme", torch.per_tensor_affine)
    if qscheme == torch.per_channel_affine_float_qparams:
        raise UsageError(f"fake-quant module {name!r} uses float zero points (per_channel_affine_float_qparams, "
                         "embedding quantization); QuantizeLinear takes integer zero points")
    qmin, qmax = getattr(fq, "quant_min", None), getattr(fq, "quant_max", None)
    if qmin is None or qmax is None:
        raise UsageError(f"fake-quant module {name!r} has no quant_min/quant_max")
    qmin, qmax = int(qmin), int(qmax)
    s = scale.detach().to(torch.float32).reshape(-1).cpu()
    z = zero_point.detach().reshape(-1).cpu()
    if z.is_floating_point():  # learnable fake-quant keeps a float zero point; its forward rounds and clamps it
        z = z.round().clamp(qmin, qmax)
    eps = getattr(fq, "eps", None)
    if isinstance(eps, torch.Tensor) and isinstance(scale, nn.Parameter):
        s = s.clamp(min=float(eps.reshape(-1)[0]))  # a learnable scale is clamped to eps in its forward
    per_channel = qscheme in _PER_CHANNEL or bool(getattr(fq, "is_per_channel", False))
    if not per_channel and s.numel() != 1:
        raise UsageError(f"fake-quant module {name!r} is per-tensor but has {s.numel()} scales")
    if s.numel() == 0:
        raise UsageError(f"fake-quant module {name!r} has no scales (its observer never saw data)")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise UsageError(f"fake-quant module {name!r} has unusable scales {s[:3].tolist()} "
                         "(never calibrated, or calibration saw only NaN/Inf)")
    return make_spec(name, s.tolist(), [int(v) for v in z.tolist()], qmin, qmax,
                      int(getattr(fq, "ch_axis", 0)) if per_channel else None)


def spec_from_qtensor(t: torch.Tensor, name: str) -> QSpec:
    """Parameters of a quantized torch tensor (what the converted model computed with)."""
    if t.dtype not in _QDTYPE_RANGE:
        raise UsageError(f"{name}: quantized tensor of type {t.dtype}; TIDL's prequantized import takes 8-bit "
                         "(quint8/qint8) only (tidl.md §2)")
    qmin, qmax = _QDTYPE_RANGE[t.dtype]
    qs = t.qscheme()
    if qs in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return make_spec(name, [float(t.q_scale())], [int(t.q_zero_point())], qmin, qmax, None)
    if qs in _PER_CHANNEL:
        return make_spec(name, t.q_per_channel_scales().tolist(), [int(v) for v in
                          t.q_per_channel_zero_points().tolist()], qmin, qmax, int(t.q_per_channel_axis()))
    raise UsageError(f"{name}: quantization scheme {qs} is not supported")


def make_spec(name: str, scale: Sequence[float], zp: Sequence[int], qmin: int, qmax: int,
               axis: int | None) -> QSpec:
    spec = QSpec(tuple(float(v) for v in scale), tuple(int(v) for v in zp), qmin, qmax, axis)
    if not spec.fits_8bit:
        raise UsageError(f"{name}: integer range [{qmin}, {qmax}] needs {spec.bits} bits; TIDL's prequantized import "
                         "takes 8-bit (int8/uint8) Q/DQ only (tidl.md §2); quantize this site to 8 bits or fewer")
    lo, hi = spec.dtype_range
    bad = [v for v in spec.zero_point if not lo <= v <= hi]
    if bad:
        raise UsageError(f"{name}: zero point {bad[0]} outside the {'int8' if spec.signed else 'uint8'} range")
    return spec

