"""The float modules a converted (integer) model's quantized modules are swapped for at export: the float
computation between Q/DQ sites (``DQ(int8 weight)`` + float op + ``Q/DQ`` of the output)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tiexport import compat
from tiexport.errors import UsageError
from tiexport.symbolics.ops import QSpec, qdq
from tiexport.symbolics.specs import spec_from_qtensor

__all__ = ["QDQ", "Lowered", "LoweredFunctional", "Requant", "lower_quantized_module"]

log = logging.getLogger(__name__)


class QDQ(nn.Module):
    """One quantization site: ``x -> Q/DQ`` (a converted model's quantize or requantize)."""

    def __init__(self, spec: QSpec, site: str) -> None:
        super().__init__()
        self.spec, self.site = spec, site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq(x, self.spec, self.site)


class Lowered(nn.Module):
    """A converted module as float computation: ``DQ(weight)``, the float op, ``Q/DQ`` of the output."""

    def __init__(self, fn: Callable[..., torch.Tensor], site: str, out_spec: QSpec | None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 params: dict[str, torch.Tensor | None] | None = None) -> None:
        super().__init__()
        self.fn, self.site, self.out_spec = fn, site, out_spec
        self.weight_spec: QSpec | None = None
        if weight is not None:
            if weight.is_quantized:
                self.weight_spec = spec_from_qtensor(weight, f"{site}.weight")
                weight = weight.dequantize()
            self.register_buffer("weight", weight.detach().clone())
        else:
            self.weight = None
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        for k, v in (params or {}).items():
            self.register_buffer(k, None if v is None else v.detach().clone())

    def forward(self, *args: Any) -> torch.Tensor:
        w = self.weight
        if w is not None and self.weight_spec is not None:
            w = qdq(w, self.weight_spec, f"{self.site}.weight")
        y = self.fn(self, w, *args)
        return y if self.out_spec is None else qdq(y, self.out_spec, self.site)


class Requant(nn.Module):
    """A float module applied to a quantized tensor in an eager converted model, followed by its Q/DQ."""

    def __init__(self, inner: nn.Module, spec: QSpec, site: str) -> None:
        super().__init__()
        self.inner, self.spec, self.site = inner, spec, site

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return qdq(self.inner(*args, **kwargs), self.spec, self.site)


class LoweredFunctional(nn.Module):
    """Eager ``QFunctional`` (add/cat/mul... as methods) as float ops + Q/DQ; methods go through ``__call__`` so the
    exporters see a module call named after the attribute."""

    _OPS: dict[str, Callable[..., torch.Tensor]] = {
        "add": lambda a, b: a + b, "add_relu": lambda a, b: F.relu(a + b), "mul": lambda a, b: a * b,
        "mul_relu": lambda a, b: F.relu(a * b), "add_scalar": lambda a, b: a + b, "mul_scalar": lambda a, b: a * b,
        "matmul": torch.matmul,
    }

    def __init__(self, specs: dict[str, QSpec], site: str) -> None:
        super().__init__()
        self.specs, self.site = specs, site

    def forward(self, op: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = torch.cat(*args, **kwargs) if op == "cat" else self._OPS[op](*args, **kwargs)
        spec = self.specs.get(op)
        return y if spec is None else qdq(y, spec, self.site)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self("add", a, b)

    def add_relu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self("add_relu", a, b)

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self("mul", a, b)

    def mul_relu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self("mul_relu", a, b)

    def add_scalar(self, a: torch.Tensor, b: float) -> torch.Tensor:
        return self("add_scalar", a, b)

    def mul_scalar(self, a: torch.Tensor, b: float) -> torch.Tensor:
        return self("mul_scalar", a, b)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self("matmul", a, b)

    def cat(self, xs: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return self("cat", xs, dim=dim)


def conv_fn(ndim: int, transposed: bool, relu: bool, stride: Any, padding: Any, dilation: Any, groups: int,
             output_padding: Any = 0) -> Callable[..., torch.Tensor]:
    conv = [F.conv1d, F.conv2d, F.conv3d][ndim - 1]
    convt = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][ndim - 1]

    def fn(m: Any, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if transposed:
            y = convt(x, w, m.bias, stride, padding, output_padding, groups, dilation)
        else:
            y = conv(x, w, m.bias, stride, padding, dilation, groups)
        return F.relu(y) if relu else y

    return fn


def linear_fn(post: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    def fn(m: Any, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w, m.bias)
        return y if post is None else post(y)

    return fn


def lower_quantized_module(m: Any, site: str, out_spec: QSpec | None) -> nn.Module:
    """A converted (``torch.ao.nn.quantized``) or reference module as float computation with Q/DQ sites."""
    cls = type(m).__name__
    kind = compat.module_kind(m)
    if cls == "Quantize":
        if out_spec is None:
            raise UsageError(f"{site}: Quantize module whose output was not recorded")
        return QDQ(out_spec, site)
    if cls == "DeQuantize":
        return nn.Identity()
    if kind == "reference":
        w_q = m.get_quantized_weight() if hasattr(m, "get_quantized_weight") else None
        if w_q is None:
            raise UsageError(f"{site}: reference module {cls} without a quantized weight")
        return _weighted(m, cls, site, None, w_q)
    if hasattr(m, "_packed_params") or cls.startswith(("Conv", "Linear")):
        w_q = m.weight() if callable(getattr(m, "weight", None)) else None
        if w_q is None:
            raise UsageError(f"{site}: cannot read the weight of quantized {cls}")
        return _weighted(m, cls, site, out_spec, w_q)
    lowered = _lower_unweighted(m, cls, site, out_spec)
    if lowered is None:
        raise UsageError(f"{site}: converted module {type(m).__module__}.{cls} has no lowering in tiexport yet; "
                         "export the fake-quant model (before convert) instead")
    return lowered


def _weighted(m: Any, cls: str, site: str, out_spec: QSpec | None, w_q: torch.Tensor) -> Lowered:
    bias = m.bias() if callable(getattr(m, "bias", None)) else getattr(m, "bias", None)
    if cls.startswith("Conv"):
        if getattr(m, "padding_mode", "zeros") != "zeros":
            raise UsageError(f"{site}: quantized {cls} with padding_mode {m.padding_mode!r} is not supported")
        transposed = "Transpose" in cls
        ndim = w_q.dim() - 2
        fn = conv_fn(ndim, transposed, "ReLU" in cls, m.stride, m.padding, m.dilation, m.groups,
                      getattr(m, "output_padding", 0))
        return Lowered(fn, site, out_spec, weight=w_q, bias=bias)
    if cls.startswith("Linear"):
        post: Callable[[torch.Tensor], torch.Tensor] | None = None
        if cls == "LinearReLU":
            post = F.relu
        elif cls == "LinearLeakyReLU":
            slope = float(getattr(m, "negative_slope", 0.01))
            post = lambda y: F.leaky_relu(y, slope)  # noqa: E731
        elif cls == "LinearTanh":
            post = torch.tanh
        return Lowered(linear_fn(post), site, out_spec, weight=w_q, bias=bias)
    raise UsageError(f"{site}: quantized module {cls} has no lowering in tiexport yet")


def _lower_unweighted(m: Any, cls: str, site: str, out_spec: QSpec | None) -> nn.Module | None:
    def act(f: Callable[[torch.Tensor], torch.Tensor]) -> Lowered:
        return Lowered(lambda _m, _w, x: f(x), site, out_spec)

    if cls == "LayerNorm":
        shape, eps = tuple(m.normalized_shape), float(m.eps)
        return Lowered(lambda lm, _w, x: F.layer_norm(x, shape, lm.ln_weight, lm.bias, eps), site, out_spec,
                        bias=m.bias, params={"ln_weight": m.weight})
    if cls == "GroupNorm":
        groups, eps = int(m.num_groups), float(m.eps)
        return Lowered(lambda lm, _w, x: F.group_norm(x, groups, lm.gn_weight, lm.bias, eps), site, out_spec,
                        bias=m.bias, params={"gn_weight": m.weight})
    if cls.startswith("InstanceNorm"):
        eps = float(m.eps)
        return Lowered(lambda lm, _w, x: F.instance_norm(x, weight=lm.in_weight, bias=lm.bias, eps=eps), site,
                        out_spec, bias=m.bias, params={"in_weight": m.weight})
    if cls in ("BatchNorm2d", "BatchNorm3d", "BNReLU2d", "BNReLU3d"):
        eps, relu = float(m.eps), "ReLU" in cls
        return Lowered(lambda lm, _w, x: (F.relu if relu else (lambda t: t))(F.batch_norm(
            x, lm.running_mean, lm.running_var, lm.bn_weight, lm.bias, False, 0.0, eps)), site, out_spec,
            bias=m.bias, params={"bn_weight": m.weight, "running_mean": m.running_mean,
                                 "running_var": m.running_var})
    simple: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ReLU6": F.relu6, "Hardswish": F.hardswish, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
        "Dropout": lambda x: x, "ReLU": F.relu,
    }
    if cls in simple:
        return act(simple[cls])
    if cls == "ELU":
        alpha = float(m.alpha)
        return act(lambda x: F.elu(x, alpha))
    if cls == "LeakyReLU":
        slope = float(m.negative_slope)
        return act(lambda x: F.leaky_relu(x, slope))
    if cls == "Softmax":
        dim = m.dim
        return act(lambda x: F.softmax(x, dim))
    if cls == "Hardtanh":
        lo, hi = float(m.min_val), float(m.max_val)
        return act(lambda x: F.hardtanh(x, lo, hi))
    return None

