"""The arithmetic under tiexport's observers and fake-quants, bit for bit torch's, only faster on CPU.

- float32 scalar arithmetic in Python (:func:`f32`), for the observers' CPU scalar path;
- TI's power-of-two rounding of scales (:func:`power_of_2_ceil`);
- exact tail selection for range shrink (:func:`tail_values`);
- vectorized per-tensor and per-channel fake quantization with torch's straight-through gradient
  (:class:`FakeQuantizePerTensor`, :class:`FakeQuantizePerChannel`, :func:`fake_quantize_cpu`).

:data:`CPU_FAST_PATHS` switches the CPU-only paths of :mod:`~tiexport.quantization.observers` and
:mod:`~tiexport.quantization.fake_quantize` (read at call time as ``kernels.CPU_FAST_PATHS``): tests turn it off to
run the device-generic tensor path, the one CUDA takes, on CPU.
"""

from __future__ import annotations

import math
import struct
from typing import Any, cast

import torch

__all__ = [
    "CPU_FAST_PATHS",
    "FakeQuantizePerChannel",
    "FakeQuantizePerTensor",
    "f32",
    "fake_quantize_cpu",
    "nan_max",
    "nan_min",
    "power_of_2_ceil",
    "power_of_2_ceil_scalar",
    "rounded_per_channel",
    "tail_values",
]

#: The CPU-only fast paths (Python-scalar observer and qparams, vectorized fake-quant). Tests turn them off to run
#: the device-generic tensor path, the one CUDA takes, on CPU.
CPU_FAST_PATHS = True

_FLOAT32 = struct.Struct("f")


def f32(value: float) -> float:
    """``value`` rounded to float32 (to nearest, ties to even), as a Python float.

    A float32 ``+ - * /`` computed in double and rounded once to float32 is the correctly rounded float32 result
    (double carries more than 2 * 24 + 2 bits), so Python arithmetic on float32 values followed by this rounding is
    bit for bit what a float32 tensor op computes. The scalar observer path below relies on it.
    """
    try:
        return float(_FLOAT32.unpack(_FLOAT32.pack(value))[0])
    except OverflowError:  # beyond float32's range: torch gives inf
        return math.copysign(math.inf, value)


def nan_min(a: float, b: float) -> float:
    """``torch.minimum`` of two floats: NaN if either is NaN (Python's ``min`` would drop a NaN silently)."""
    return math.nan if a != a or b != b else min(a, b)


def nan_max(a: float, b: float) -> float:
    return math.nan if a != a or b != b else max(a, b)


def power_of_2_ceil_scalar(scale: float) -> float:
    """:func:`power_of_2_ceil` of one positive float, the same frexp rule."""
    if not math.isfinite(scale) or scale <= 0.0:
        return float(power_of_2_ceil(torch.tensor([scale]))[0])  # inf / NaN / 0: whatever the tensor rule gives
    mantissa, exponent = math.frexp(scale)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def power_of_2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2(scale))``, exactly a power of two (TI's rounding; tidl.md §2, "Power-of-2 in TI's wrapper").

    From the float's own exponent (``frexp``: ``scale = m * 2**e`` with ``m`` in [0.5, 1)), not from ``log2``: a
    float32 ``log2`` of a scale one ulp above ``2**k`` rounds to ``k`` and gave ``2**k``, a power of two *below* the
    scale (32 such exponents between 2**-30 and 2**9, a test holds it).
    """
    mantissa, exponent = torch.frexp(scale.float())
    # m == 0.5: the scale is 2**(e-1) itself; otherwise the next power up is 2**e
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    # ldexp builds the float from its exponent, so the result is exactly 2**k, with no pow() rounding
    return torch.ldexp(torch.ones_like(mantissa), exponent)


def tail_values(flat: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m``-th smallest and ``m``-th largest value of the 1-D tensor ``flat`` (exact; ``2 * m <= numel``).

    ``torch.topk`` over the whole tensor costs 6.6 ms for 1M values on one core (both ends), a third of a ResNet-20
    QAT step (bench/RESULTS.md, QAT section). Instead: cut the values into ``width`` contiguous groups of ``depth``,
    take each group's maximum (one vectorized pass), keep the ``m`` groups with the largest maxima and select among
    their values only: 0.7 ms. Exact: if ``t`` is the ``m``-th largest group maximum, at least ``m`` values are
    >= ``t``, so the ``m``-th largest value ``v`` is >= ``t``; every value above ``t`` lies in a group whose maximum
    is above ``t``, which is one of the ``m`` kept; and if ``v == t`` the kept groups hold ``m`` values >= ``t``
    already. Likewise for the minimum. Fixed shapes throughout: no host sync on CUDA.
    """
    n = flat.numel()
    depth = max(1, int(math.sqrt(n / m)))  # values per group: the kept groups hold about sqrt(n * m) values
    # a power of two near that which divides n leaves no remainder to append (activation sizes have factors of 2)
    power = 1 << (depth.bit_length() - 1)
    for candidate in (2 * power, power):
        if n % candidate == 0:
            depth = candidate
            break
    width = n // depth
    if width <= m:
        return (torch.topk(flat, m, largest=False, sorted=False).values.max(),
                torch.topk(flat, m, largest=True, sorted=False).values.min())
    main = flat[: depth * width].view(width, depth)
    # amax and amin separately: torch.aminmax(dim=...) is 9x slower than either on CPU
    top = torch.topk(torch.amax(main, dim=1), m, sorted=False).indices
    bottom = torch.topk(torch.amin(main, dim=1), m, largest=False, sorted=False).indices
    high, low = main.index_select(0, top).reshape(-1), main.index_select(0, bottom).reshape(-1)
    if depth * width < n:  # fewer than depth values left over: always candidates
        rest = flat[depth * width:]
        high, low = torch.cat([high, rest]), torch.cat([low, rest])
    hi = torch.topk(high, m, sorted=False).values.min()
    lo = torch.topk(low, m, largest=False, sorted=False).values.max()
    return lo, hi



def fake_quantize_cpu(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization, bit for bit what ``torch.fake_quantize_per_tensor_affine`` computes
    (``(clamp(nearbyint(x * (1 / scale)) + zp, qmin, qmax) - zp) * scale`` in float32, ties to even). ``scale`` is a
    float32 value, ``zero_point`` a whole number.

    torch 2.13's CPU kernel calls ``std::nearbyint`` per element, unvectorized: 1.6 ms for a 64x32x8x8 activation on
    one core, against 0.1 ms for these in-place vectorized ops (bench/RESULTS.md, QAT and PTC sections). It was
    the largest single cost of a QAT step and of PTC calibration on CPU.
    """
    q = _rounded(x, scale)
    lo, hi = _grid_bounds(zero_point, qmin, qmax)
    return q.clamp_(lo, hi).mul_(float(scale))


def _rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Python scalars: a one-element tensor operand takes torch's slow broadcasting path (mul_: 1.1 ms vs 0.17 ms
    # per 1M values). Exact: a float32 scale converts to double unchanged, and torch rounds the double 1 / scale to
    # float32 when it multiplies, which gives the float32 reciprocal (double rounding is harmless for a division).
    return torch.mul(x, 1.0 / float(scale)).round_()


def rounded_per_channel(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # torch's per-channel kernel: nearbyint(x * (1.0f / scale)), the float32 reciprocal per channel
    return torch.mul(x, torch.reciprocal(scale)).round_()


def _grid_bounds(zero_point: int, qmin: int, qmax: int) -> tuple[float, float]:
    # clamp(q + z, qmin, qmax) - z == clamp(q, qmin - z, qmax - z): q and z are small whole numbers, exact in float32
    z = float(zero_point)
    return qmin - z, qmax - z


def _passed_gradient(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    """The straight-through gradient of both fake-quant Functions: ``grad`` where the saved rounded value lies in
    the bounds saved with it (``lo - 0.5 < q < hi + 0.5``, i.e. ``lo <= q <= hi`` for whole numbers), else 0."""
    (q,) = ctx.saved_tensors
    lo, hi = ctx.bounds
    return cast(torch.Tensor, torch.ops.aten.hardtanh_backward(grad, q, lo, hi))


class FakeQuantizePerTensor(torch.autograd.Function):
    """:func:`fake_quantize_cpu` with the straight-through gradient of torch's fake-quant: the incoming gradient
    where the rounded value lies on the grid, zero where it was clipped.

    torch saves a bool mask and multiplies; on torch 2.13's CPU, bool comparisons and bool-times-float run 3-7x
    slower than float ops (1.2 ms for the comparison and 3.1 ms for the multiply per 1M values, against 0.5 ms for
    the whole backward here). This saves the rounded, unclipped values instead (float32: four bytes per element
    where the mask takes one) and passes the gradient with ``hardtanh_backward``, one vectorized pass:
    ``lo <= q <= hi`` for whole numbers ``q`` is ``lo - 0.5 < q < hi + 0.5``. The gradient is torch's bit for bit
    for finite inputs (a test holds it); a NaN input, which torch's mask zeroes, passes its gradient here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
        q = _rounded(x, scale)
        lo, hi = _grid_bounds(zero_point, qmin, qmax)
        ctx.save_for_backward(q)
        ctx.bounds = (lo - 0.5, hi + 0.5)
        return q.clamp(lo, hi).mul_(float(scale))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _passed_gradient(ctx, grad), None, None, None, None


class FakeQuantizePerChannel(torch.autograd.Function):
    """Per-channel fake quantization with zero points 0 on CPU, bit for bit ``torch.fake_quantize_per_channel_affine``
    (``clamp(nearbyint(x * (1.0f / scale)), qmin, qmax) * scale``), with the same straight-through gradient by
    ``hardtanh_backward`` as :class:`FakeQuantizePerTensor`. torch's CPU kernel rounds per element, unvectorized,
    and multiplies by a bool mask in backward: for a 32x16x3x3 weight on one core, forward 62 us against 15 us here,
    forward and backward (with the backward call's fixed cost) 93 us against 58 us."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = rounded_per_channel(x, scale)
        ctx.save_for_backward(q)
        ctx.bounds = (qmin - 0.5, qmax + 0.5)
        return q.clamp(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _passed_gradient(ctx, grad), None, None, None

