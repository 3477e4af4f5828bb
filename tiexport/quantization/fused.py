"""Fused QAT ops: one dispatched op per fake-quant call, forward and backward, instead of 10-40.

A training step of a small network on a GPU is launch-bound, and on CPU each small tensor op costs microseconds of
dispatch; torch.ao's default QAT observes and fake-quantizes in one op (``fused_moving_avg_obs_fake_quant``) with
one backward op. These are tiexport's counterparts, registered with ``torch.library`` in the ``tiexport_qat``
namespace:

- ``fake_quant_activation``: an activation: observe (range shrink, aggregation), compute and write the qparams,
  fake-quantize; backward: the straight-through gradient (one ``hardtanh_backward``).
- ``fake_quant_weight``: a weight: observe it (per channel or per tensor), write the scales, fake-quantize;
  backward likewise.
- ``conv_bn_weight``: the weight a Conv+BN convolves with while batch norm updates, ``fq(W * f) / f`` with
  ``f = gamma / sqrt(running_var + eps)`` per output channel (:mod:`tiexport.quantization.conv_bn`), observer
  included; backward (``conv_bn_weight_backward``, one op): the gradients of ``W`` and ``gamma``.
- ``conv_bn_frozen``: with frozen statistics, the folded weight ``fq(W * f)`` and bias ``beta + (b_c - mean) * f``
  (:func:`~tiexport.quantization.conv_bn.conv_bn_folding`); backward (``conv_bn_frozen_backward``): the gradients
  of ``W``, ``gamma``, ``beta`` and ``b_c``.

The backward ops apply the formulas autograd applies to the unfused expressions (torch's derivatives.yaml), and
each op's CPU kernel is the existing vectorized CPU code (:mod:`~tiexport.quantization.kernels`, the observers'
scalar path in :mod:`~tiexport.quantization.observers`), so outputs, gradients and buffers are bit for bit those
of the unfused path (tests hold it for every qconfig type, live and frozen, range shrink on and off). On CPU the
fusion saves dispatch only, the arithmetic is unchanged. The ops serve the CPU forwards the fast paths cover with
autograd on: training steps (an input quantizer's input needs no gradient: the CPU kernel then runs, clipping in
place and saving nothing). PTC calibration and evaluation run without autograd and keep the unfused path.

Only CPU kernels are registered: on CUDA (and under DDP, where activation observers reduce across ranks) the
unfused, sync-free tensor path runs as before. A CUDA kernel (Triton, or a ``torch.compile`` of the tensor path)
registered under the same schemas is what it takes to cut the kernel launches of a GPU step.

The ops mutate the fake-quant's and observer's buffers, which ``torch.library``'s functional autograd registration
does not allow, so each op's autograd kernel (``AutogradCPU``) is a :class:`torch.autograd.Function` registered
directly (eager mode; ``torch.compile`` would need functional variants). Nothing here reaches an export:
``tiexport.export`` replaces every fake-quant's forward before tracing. :data:`FUSED_OPS` switches the ops off
(read at call time as ``fused.FUSED_OPS``): the tests' unfused reference.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from tiexport.quantization.kernels import (
    _grid_bounds,
    _passed_gradient,
    _rounded,
    rounded_per_channel,
)
from tiexport.quantization.observers import observe_scalar, qparams_scalar, weight_range, weight_scale

__all__ = ["FUSED_OPS", "NAMESPACE", "conv_bn_frozen", "conv_bn_weight", "fake_quant_activation",
           "fake_quant_weight"]

#: The fused ops in training steps on CPU. Tests turn it off to run the unfused reference path.
FUSED_OPS = True

NAMESPACE = "tiexport_qat"

_LIB = torch.library.Library(NAMESPACE, "DEF")
_LIB.define(
    "fake_quant_activation(Tensor x, Tensor(a!) scale, Tensor(b!) zero_point, Tensor(c!) min_val, "
    "Tensor(d!) max_val, Tensor(e!) num_batches, Tensor eps, bool observe, bool symmetric, bool force_signed, "
    "bool power_of_2, float range_shrink_percentile, bool mean_aggregation) -> Tensor"
)
_LIB.define(
    "fake_quant_weight(Tensor w, Tensor(a!) scale, Tensor(b!) zero_point, Tensor(c!) min_val, Tensor(d!) max_val, "
    "Tensor eps, bool observe, bool per_channel, int ch_axis, bool power_of_2, int quant_min, int quant_max) -> Tensor"
)
_LIB.define(
    "conv_bn_frozen(Tensor w, Tensor gamma, Tensor beta, Tensor? conv_bias, Tensor running_mean, "
    "Tensor running_var, float bn_eps, Tensor(a!) scale, Tensor(b!) zero_point, Tensor(c!) min_val, "
    "Tensor(d!) max_val, Tensor eps, bool observe, bool per_channel, int ch_axis, bool power_of_2, int quant_min, "
    "int quant_max) -> (Tensor, Tensor)"
)
_LIB.define(
    "conv_bn_frozen_backward(Tensor grad_weight, Tensor grad_bias, Tensor w, Tensor std, Tensor factor, "
    "Tensor centered, Tensor q, float lo, float hi, bool need_w, bool need_gamma, bool need_beta, "
    "bool need_conv_bias) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "conv_bn_weight_backward(Tensor grad, Tensor w, Tensor std, Tensor factor, Tensor q, Tensor fq_w, float lo, "
    "float hi, bool need_w, bool need_gamma) -> (Tensor, Tensor)"
)
_LIB.define(
    "conv_bn_weight(Tensor w, Tensor gamma, Tensor running_var, float bn_eps, Tensor(a!) scale, "
    "Tensor(b!) zero_point, Tensor(c!) min_val, Tensor(d!) max_val, Tensor eps, bool observe, bool per_channel, "
    "int ch_axis, bool power_of_2, int quant_min, int quant_max) -> Tensor"
)


# ------------------------------------------------------------------------------------------ activation point
def _activation_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, min_val: torch.Tensor,
                     max_val: torch.Tensor, num_batches: torch.Tensor, eps: torch.Tensor, observe: bool,
                     symmetric: bool, force_signed: bool, power_of_2: bool, range_shrink_percentile: float,
                     mean_aggregation: bool) -> tuple[torch.Tensor, float, float, float]:
    """Observe (if asked), write the qparams, and round: ``(q, lo, hi, scale)`` with the rounded, unclipped values
    ``q`` and the grid ``[lo, hi]`` they are clipped to (what ``TidlFakeQuantize._forward`` computes on CPU)."""
    if observe:
        observe_scalar(x, min_val, max_val, num_batches, range_shrink_percentile, mean_aggregation)
        s, z = qparams_scalar(min_val, max_val, eps, symmetric, force_signed, power_of_2)
        if scale.shape != (1,):
            scale.resize_(1)
            zero_point.resize_(1)
        scale.fill_(s)
        zero_point.fill_(z)
    else:
        s, z = scale.reshape(-1)[0].item(), int(zero_point.reshape(-1)[0].item())
    # ActivationObserver.quant_min / quant_max: int8 for symmetric once anything negative was seen
    signed = symmetric and (force_signed or min_val.item() < 0)
    lo, hi = _grid_bounds(z, -128 if signed else 0, 127 if signed else 255)
    return _rounded(x, s), lo, hi, s


def _activation_cpu(x: torch.Tensor, *args: Any) -> torch.Tensor:
    q, lo, hi, s = _activation_grid(x, *args)
    return q.clamp_(lo, hi).mul_(float(s))


class _ActivationFunction(torch.autograd.Function):
    """The autograd kernel: :class:`~tiexport.quantization.kernels.FakeQuantizePerTensor`'s forward and backward
    (the rounded values saved, the gradient passed by ``hardtanh_backward``), the observer update before."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rest: tuple[Any, ...]) -> torch.Tensor:
        # the arguments without gradients in one tuple: Function.apply's cost grows with its argument count
        q, lo, hi, s = _activation_grid(x, *rest)
        ctx.save_for_backward(q)
        ctx.bounds = (lo - 0.5, hi + 0.5)
        return q.clamp(lo, hi).mul_(float(s))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _passed_gradient(ctx, grad), None


def _activation_autograd(x: torch.Tensor, *rest: Any) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return cast(torch.Tensor, _ActivationFunction.apply(x, rest))
    return _activation_cpu(x, *rest)  # no gradient wanted: the CPU kernel (in-place clipping, nothing saved)


_LIB.impl("fake_quant_activation", _activation_cpu, "CPU")
_LIB.impl("fake_quant_activation", _activation_autograd, "AutogradCPU")


def fake_quant_activation(x: torch.Tensor, fq: Any, observer: Any, observe: bool) -> torch.Tensor:
    """``fq``'s training forward of a float32 CPU activation ``x`` (non-empty) with the
    :class:`~tiexport.quantization.observers.ActivationObserver` ``observer`` (observing when ``observe``, which
    the caller allows only on the observer's scalar path), in one dispatched op."""
    b, o = fq._buffers, observer._buffers
    out = _OPS["fake_quant_activation"](
        x, b["scale"], b["zero_point"], o["min_val"], o["max_val"], o["num_batches"], o["eps"], observe,
        observer.symmetric, observer.force_signed, observer.power_of_2, observer.range_shrink_percentile,
        observer.range_aggregation == "mean")
    if observe:
        observer._seen_data = True
    return cast(torch.Tensor, out)


# ------------------------------------------------------------------------------------------------- weights
def _observe_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, min_val: torch.Tensor,
                    max_val: torch.Tensor, eps: torch.Tensor, per_channel: bool, ch_axis: int, power_of_2: bool,
                    quant_max: int) -> None:
    """``WeightObserver.forward`` and the fake-quant's scale write, as ``TidlFakeQuantize._forward`` does them."""
    lo, hi = weight_range(w, per_channel, ch_axis)
    if min_val.shape != lo.shape:
        min_val.resize_(lo.shape)
        max_val.resize_(hi.shape)
    min_val.copy_(lo)
    max_val.copy_(hi)
    s = weight_scale(min_val, max_val, eps, quant_max, power_of_2)
    if scale.shape != s.shape:
        scale.resize_(s.shape)
        zero_point.resize_(s.shape)
    scale.copy_(s)
    zero_point.zero_()


def _weight_grid(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, min_val: torch.Tensor,
                 max_val: torch.Tensor, eps: torch.Tensor, observe: bool, per_channel: bool, ch_axis: int,
                 power_of_2: bool, quant_min: int, quant_max: int) -> tuple[torch.Tensor, float, float, Any]:
    """Observe (if asked) and round: ``(q, lo, hi, scale)``, the scale a float (per tensor) or a tensor shaped to
    broadcast along ``ch_axis`` (per channel, zero points 0: the caller checked)."""
    if observe:
        _observe_weight(w, scale, zero_point, min_val, max_val, eps, per_channel, ch_axis, power_of_2, quant_max)
    if per_channel:
        shape = [1] * w.dim()
        shape[ch_axis] = -1
        scale_t = scale.reshape(shape)
        return rounded_per_channel(w, scale_t), float(quant_min), float(quant_max), scale_t
    s, z = scale.reshape(-1)[0].item(), int(zero_point.reshape(-1)[0].item())
    lo, hi = _grid_bounds(z, quant_min, quant_max)
    return _rounded(w, s), lo, hi, float(s)


def _weight_cpu(w: torch.Tensor, *args: Any) -> torch.Tensor:
    q, lo, hi, s = _weight_grid(w, *args)
    return q.clamp_(lo, hi).mul_(s)


class _WeightFunction(torch.autograd.Function):
    """Per-tensor: :class:`~tiexport.quantization.kernels.FakeQuantizePerTensor`; per-channel:
    :class:`~tiexport.quantization.kernels.FakeQuantizePerChannel`; the weight observer before."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, rest: tuple[Any, ...]) -> torch.Tensor:
        q, lo, hi, s = _weight_grid(w, *rest)
        ctx.save_for_backward(q)
        ctx.bounds = (lo - 0.5, hi + 0.5)
        return q.clamp(lo, hi).mul_(s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _passed_gradient(ctx, grad), None


def _weight_autograd(w: torch.Tensor, *rest: Any) -> torch.Tensor:
    if w.requires_grad and torch.is_grad_enabled():
        return cast(torch.Tensor, _WeightFunction.apply(w, rest))
    return _weight_cpu(w, *rest)  # no gradient wanted: the CPU kernel (in-place clipping, nothing saved)


_LIB.impl("fake_quant_weight", _weight_cpu, "CPU")
_LIB.impl("fake_quant_weight", _weight_autograd, "AutogradCPU")


def _weight_args(fq: Any, observer: Any, observe: bool) -> tuple[Any, ...]:
    b, o = fq._buffers, observer._buffers
    return (b["scale"], b["zero_point"], o["min_val"], o["max_val"], o["eps"], observe, bool(fq.is_per_channel),
            int(fq.ch_axis), bool(observer.power_of_2), int(observer.quant_min), int(observer.quant_max))


def fake_quant_weight(w: torch.Tensor, fq: Any, observer: Any, observe: bool) -> torch.Tensor:
    """``fq``'s training forward of a float32 CPU weight ``w`` (non-empty) with the
    :class:`~tiexport.quantization.observers.WeightObserver` ``observer``, in one dispatched op. Per channel, the
    caller has checked that the zero points are 0 (they are once observed)."""
    return cast(torch.Tensor, _OPS["fake_quant_weight"](w, *_weight_args(fq, observer, observe)))


# ------------------------------------------------------------------------------------ Conv+BN folded weight
def _bn_factor(gamma: torch.Tensor, running_var: torch.Tensor, bn_eps: float, dim: int) -> torch.Tensor:
    # conv_bn._conv_bn_forward: (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, ...)
    return (gamma / torch.sqrt(running_var + bn_eps)).reshape([-1] + [1] * (dim - 1))


def _conv_bn_weight_cpu(w: torch.Tensor, gamma: torch.Tensor, running_var: torch.Tensor, bn_eps: float,
                        *args: Any) -> torch.Tensor:
    factor = _bn_factor(gamma, running_var, bn_eps, w.dim())
    return _weight_cpu(w * factor, *args) / factor


class _ConvBnWeightFunction(torch.autograd.Function):
    """``fq(W * f) / f`` with ``f = (gamma / sqrt(var + eps)).reshape(-1, 1, ...)``, and the backward autograd runs
    for those expressions, op for op: ``DivBackward0`` (``grad / f`` for the fake-quantized weight and
    ``-grad * ((a / f) / f)`` summed to ``f``'s shape for ``f``), the straight-through gradient, ``MulBackward0``
    (``g * f`` for ``W``, ``g * W`` summed to ``f``'s shape for ``f``), the two contributions to ``f`` added in the
    order the autograd engine adds them, then ``ViewBackward`` and ``DivBackward0`` for ``gamma``."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, gamma: torch.Tensor, rest: tuple[Any, ...]) -> torch.Tensor:
        running_var, bn_eps, *args = rest
        std = torch.sqrt(running_var + bn_eps)
        factor = (gamma / std).reshape([-1] + [1] * (w.dim() - 1))
        q, lo, hi, s = _weight_grid(w * factor, *args)
        fq_w = q.clamp(lo, hi).mul_(s)
        ctx.save_for_backward(w, std, factor, q, fq_w)
        ctx.bounds = (lo - 0.5, hi + 0.5)
        return fq_w / factor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, std, factor, q, fq_w = ctx.saved_tensors
        need_w, need_gamma = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        grad_w, grad_gamma = _OPS["conv_bn_weight_backward"](
            grad, w, std, factor, q, fq_w, ctx.bounds[0], ctx.bounds[1], need_w, need_gamma)
        return grad_w if need_w else None, grad_gamma if need_gamma else None, None


def _conv_bn_weight_backward(grad: torch.Tensor, w: torch.Tensor, std: torch.Tensor, factor: torch.Tensor,
                             q: torch.Tensor, fq_w: torch.Tensor, lo: float, hi: float, need_w: bool,
                             need_gamma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``W`` and ``gamma`` (an empty tensor for one not needed) through ``fq(W * f) / f``, as
    :class:`_ConvBnWeightFunction` says, in one dispatched op."""
    grad_w = grad_gamma = None
    # DivBackward0 of fq_w / factor (torch/csrc/autograd/FunctionsManual.cpp: div_tensor_self_backward,
    # div_tensor_other_backward), both computed, as autograd does when both inputs need a gradient
    grad_fq = grad / factor
    grad_factor_div = None
    if need_gamma:
        grad_factor_div = (-grad * ((fq_w / factor) / factor)).sum_to_size(factor.shape)
    # the straight-through gradient of the fake-quant
    grad_scaled = cast(torch.Tensor, torch.ops.aten.hardtanh_backward(grad_fq, q, lo, hi))
    # MulBackward0 of w * factor
    if need_w:
        grad_w = grad_scaled * factor
    if need_gamma:
        grad_factor_mul = (grad_scaled * w).sum_to_size(factor.shape)
        assert grad_factor_div is not None
        # the two contributions to factor's gradient, added (float addition commutes: the engine's order of
        # accumulation does not matter)
        grad_factor = grad_factor_div + grad_factor_mul
        # ViewBackward (reshape) and DivBackward0 of gamma / std: grad / std
        grad_gamma = grad_factor.reshape(std.shape) / std
    empty = grad.new_empty(0)
    return (empty if grad_w is None else grad_w), (empty if grad_gamma is None else grad_gamma)


_LIB.impl("conv_bn_weight_backward", _conv_bn_weight_backward, "CPU")


def _conv_bn_weight_autograd(w: torch.Tensor, gamma: torch.Tensor, *rest: Any) -> torch.Tensor:
    if (w.requires_grad or gamma.requires_grad) and torch.is_grad_enabled():
        return cast(torch.Tensor, _ConvBnWeightFunction.apply(w, gamma, rest))
    return _conv_bn_weight_cpu(w, gamma, *rest)  # no gradient wanted: the CPU kernel (in-place clipping, nothing saved)


_LIB.impl("conv_bn_weight", _conv_bn_weight_cpu, "CPU")
_LIB.impl("conv_bn_weight", _conv_bn_weight_autograd, "AutogradCPU")


def conv_bn_weight(w: torch.Tensor, gamma: torch.Tensor, running_var: torch.Tensor, bn_eps: float, fq: Any,
                   observer: Any, observe: bool) -> torch.Tensor:
    """``fq(w * f) / f`` for a training-mode Conv+BN (``f = gamma / sqrt(running_var + bn_eps)`` per output
    channel), the weight fake-quant ``fq`` observing when ``observe``, in one dispatched op."""
    return cast(torch.Tensor, _OPS["conv_bn_weight"](
        w, gamma, running_var, float(bn_eps), *_weight_args(fq, observer, observe)))


# ------------------------------------------------------------------------- Conv+BN, batch norm frozen
def _frozen_folding(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, conv_bias: torch.Tensor | None,
                    running_mean: torch.Tensor, running_var: torch.Tensor,
                    bn_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~tiexport.quantization.conv_bn.conv_bn_folding` and the folded weight, expression for expression:
    ``(folded weight, bias, std, factor reshaped per output channel, b_c - mean)``."""
    std = torch.sqrt(running_var + bn_eps)
    factor = gamma / std
    centered = (conv_bias if conv_bias is not None else torch.zeros_like(std)) - running_mean
    bias = beta + centered * factor
    factor_r = factor.reshape([-1] + [1] * (w.dim() - 1))
    return w * factor_r, bias, std, factor_r, centered


def _conv_bn_frozen_cpu(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, conv_bias: torch.Tensor | None,
                        running_mean: torch.Tensor, running_var: torch.Tensor, bn_eps: float,
                        *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    folded, bias, _, _, _ = _frozen_folding(w, gamma, beta, conv_bias, running_mean, running_var, bn_eps)
    return _weight_cpu(folded, *args), bias


class _ConvBnFrozenFunction(torch.autograd.Function):
    """``(fq(W * f), beta + (b_c - mean) * f)`` with ``f = gamma / sqrt(var + eps)``: the frozen-statistics Conv+BN
    of :mod:`~tiexport.quantization.conv_bn`, whose backward (one op) applies autograd's formulas for those
    expressions: the straight-through gradient, ``MulBackward0`` of ``W * f`` (``g * f`` for ``W``, ``g * W``
    summed to ``f``'s shape, then ``ViewBackward``), ``AddBackward0`` (the bias gradient for ``beta``),
    ``MulBackward0`` of ``(b_c - mean) * f`` (``g * f`` for ``b_c`` through ``SubBackward0``, ``g * (b_c - mean)``
    for ``f``), the two contributions to ``f`` added, ``DivBackward0`` for ``gamma`` (``g / std``)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, conv_bias: torch.Tensor | None,
                rest: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        running_mean, running_var, bn_eps, *args = rest
        folded, bias, std, factor_r, centered = _frozen_folding(w, gamma, beta, conv_bias, running_mean,
                                                                running_var, bn_eps)
        q, lo, hi, s = _weight_grid(folded, *args)
        ctx.save_for_backward(w, std, factor_r, centered, q)
        ctx.bounds = (lo - 0.5, hi + 0.5)
        return q.clamp(lo, hi).mul_(s), bias

    @staticmethod
    def backward(ctx: Any, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, std, factor_r, centered, q = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:4]]
        grads = _OPS["conv_bn_frozen_backward"](
            grad_weight, grad_bias, w, std, factor_r, centered, q, ctx.bounds[0], ctx.bounds[1], *needs)
        return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None)


def _conv_bn_frozen_backward(grad_weight: torch.Tensor, grad_bias: torch.Tensor, w: torch.Tensor,
                             std: torch.Tensor, factor_r: torch.Tensor, centered: torch.Tensor, q: torch.Tensor,
                             lo: float, hi: float, need_w: bool, need_gamma: bool, need_beta: bool,
                             need_conv_bias: bool) -> tuple[torch.Tensor, ...]:
    """The gradients of ``W``, ``gamma``, ``beta`` and ``b_c`` (an empty tensor for one not needed), as
    :class:`_ConvBnFrozenFunction` says, in one dispatched op."""
    empty = grad_weight.new_empty(0)
    grad_w = grad_gamma = grad_beta = grad_conv_bias = empty
    grad_folded = cast(torch.Tensor, torch.ops.aten.hardtanh_backward(grad_weight, q, lo, hi))
    if need_w:
        grad_w = grad_folded * factor_r
    if need_conv_bias:
        grad_conv_bias = grad_bias * factor_r.reshape(std.shape)
    if need_beta:
        grad_beta = grad_bias.clone()  # a fresh tensor: an op's outputs must not alias its inputs
    if need_gamma:
        grad_factor_weight = (grad_folded * w).sum_to_size(factor_r.shape).reshape(std.shape)
        grad_factor_bias = grad_bias * centered
        grad_gamma = (grad_factor_bias + grad_factor_weight) / std
    return grad_w, grad_gamma, grad_beta, grad_conv_bias


def _conv_bn_frozen_autograd(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *args: Any) -> Any:
    if torch.is_grad_enabled() and (w.requires_grad or gamma.requires_grad or beta.requires_grad
                                    or (args[0] is not None and args[0].requires_grad)):
        return _ConvBnFrozenFunction.apply(w, gamma, beta, args[0], args[1:])
    return _conv_bn_frozen_cpu(w, gamma, beta, *args)


_LIB.impl("conv_bn_frozen", _conv_bn_frozen_cpu, "CPU")
_LIB.impl("conv_bn_frozen", _conv_bn_frozen_autograd, "AutogradCPU")
_LIB.impl("conv_bn_frozen_backward", _conv_bn_frozen_backward, "CPU")


def conv_bn_frozen(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, conv_bias: torch.Tensor | None,
                   running_mean: torch.Tensor, running_var: torch.Tensor, bn_eps: float, fq: Any, observer: Any,
                   observe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake-quantized folded weight and the folded bias of a Conv+BN with frozen statistics, in one op."""
    weight, bias = _OPS["conv_bn_frozen"](
        w, gamma, beta, conv_bias, running_mean, running_var, float(bn_eps), *_weight_args(fq, observer, observe))
    return weight, bias


#: The ops' default overloads, looked up once (``torch.ops.<ns>.<op>`` resolves the overload packet per call)
_OPS: dict[str, Any] = {name: getattr(torch.ops.tiexport_qat, name).default for name in (
    "fake_quant_activation", "fake_quant_weight", "conv_bn_weight", "conv_bn_weight_backward", "conv_bn_frozen",
    "conv_bn_frozen_backward")}
