"""Make any torch.ao-quantized model exportable: every quantization site becomes one ``tiexport::quantize_dequantize``
call with frozen parameters, named after its module.

What :class:`ExportLowering` does on entry, and undoes on exit (the user's model is left as it was found):

- every module's ``training`` flag is set to False directly (not via ``eval()``, whose overrides in wrappers may count
  epochs or freeze things); the flags are restored one by one afterwards;
- **fake-quant modules** (any ``torch.ao`` ``FakeQuantizeBase`` subclass: FakeQuantize, FusedMovingAvgObsFakeQuantize,
  FixedQParams..., learnable ones, user subclasses): observers are disabled (``observer_enabled``/learning flags
  saved and restored) and ``forward`` is patched, on the instance, to call the custom op with the module's
  ``scale``/``zero_point``/``quant_min``/``quant_max``/``qscheme``/``ch_axis``. A disabled fake-quant
  (``fake_quant_enabled == 0``) exports as identity, with a warning;
- **QAT conv-bn modules** (``torch.ao.nn.intrinsic.qat`` ConvBn/ConvBnReLU): BatchNorm folded into the conv weight
  and bias (the same ``w * gamma / std`` the module fake-quantizes in eval), so the export is Conv (+Relu), not
  Conv/Div/Add/BatchNormalization;
- **calibrated but unconverted models** (observers, no fake-quant): converted on a copy (``convert_fx``/``convert``);
- **converted models** (``convert_fx`` or eager ``convert``: quantized tensors, ``torch.ops.quantized.*``, quantized
  modules) and **reference models** (``convert_to_reference_fx``): one probe run on the example inputs records the
  quantization parameters of every quantized tensor; then FX graphs are rewritten (a new GraphModule sharing the
  user's float modules; the original is untouched) and eager models get their quantized modules swapped (restored on
  exit) for float computations with Q/DQ sites: ``quantize_per_tensor -> Q/DQ``, ``dequantize -> nothing``, a
  quantized conv/linear -> ``DQ(int8 weight)`` + float op + ``Q/DQ`` of its output, ``quantized.add/cat/matmul/...``
  -> float op + ``Q/DQ``, and a float op on quantized tensors (pooling, resize, ...) -> the op + ``Q/DQ`` with the
  same parameters (what TIDL needs around those layers, tidl.md §2), except pure view ops (reshape, flatten, ...).

Site names (the ``module`` of each Q/DQ, see ``tiexport.symbolics.export``): a fake-quant module's qualified name;
in converted models ``<module>`` for a lowered quantized module's output, ``<module>.weight`` for its weight, and the
FX node's name for functional ops (``add_relu``, ``quantize_per_tensor``...).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tiexport import compat
from tiexport.errors import UsageError
from tiexport.symbolics.ops import QSpec, qdq

__all__ = ["ExportLowering", "spec_from_fake_quant", "spec_from_qtensor"]

log = logging.getLogger(__name__)

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_QDTYPE_RANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


# ------------------------------------------------------------------------------------------------ quantization specs


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
    return _make_spec(name, s.tolist(), [int(v) for v in z.tolist()], qmin, qmax,
                      int(getattr(fq, "ch_axis", 0)) if per_channel else None)


def spec_from_qtensor(t: torch.Tensor, name: str) -> QSpec:
    """Parameters of a quantized torch tensor (what the converted model computed with)."""
    if t.dtype not in _QDTYPE_RANGE:
        raise UsageError(f"{name}: quantized tensor of type {t.dtype}; TIDL's prequantized import takes 8-bit "
                         "(quint8/qint8) only (tidl.md §2)")
    qmin, qmax = _QDTYPE_RANGE[t.dtype]
    qs = t.qscheme()
    if qs in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return _make_spec(name, [float(t.q_scale())], [int(t.q_zero_point())], qmin, qmax, None)
    if qs in _PER_CHANNEL:
        return _make_spec(name, t.q_per_channel_scales().tolist(), [int(v) for v in
                          t.q_per_channel_zero_points().tolist()], qmin, qmax, int(t.q_per_channel_axis()))
    raise UsageError(f"{name}: quantization scheme {qs} is not supported")


def _make_spec(name: str, scale: Sequence[float], zp: Sequence[int], qmin: int, qmax: int,
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


# ------------------------------------------------------------------------------------- modules used in exports


class _QDQ(nn.Module):
    """One quantization site: ``x -> Q/DQ`` (a converted model's quantize or requantize)."""

    def __init__(self, spec: QSpec, site: str) -> None:
        super().__init__()
        self.spec, self.site = spec, site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq(x, self.spec, self.site)


class _Lowered(nn.Module):
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


class _Requant(nn.Module):
    """A float module applied to a quantized tensor in an eager converted model, followed by its Q/DQ."""

    def __init__(self, inner: nn.Module, spec: QSpec, site: str) -> None:
        super().__init__()
        self.inner, self.spec, self.site = inner, spec, site

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return qdq(self.inner(*args, **kwargs), self.spec, self.site)


class _LoweredFunctional(nn.Module):
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


def _conv_fn(ndim: int, transposed: bool, relu: bool, stride: Any, padding: Any, dilation: Any, groups: int,
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


def _linear_fn(post: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    def fn(m: Any, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w, m.bias)
        return y if post is None else post(y)

    return fn


def _lower_quantized_module(m: Any, site: str, out_spec: QSpec | None) -> nn.Module:
    """A converted (``torch.ao.nn.quantized``) or reference module as float computation with Q/DQ sites."""
    cls = type(m).__name__
    kind = compat.module_kind(m)
    if cls == "Quantize":
        if out_spec is None:
            raise UsageError(f"{site}: Quantize module whose output was not recorded")
        return _QDQ(out_spec, site)
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


def _weighted(m: Any, cls: str, site: str, out_spec: QSpec | None, w_q: torch.Tensor) -> _Lowered:
    bias = m.bias() if callable(getattr(m, "bias", None)) else getattr(m, "bias", None)
    if cls.startswith("Conv"):
        if getattr(m, "padding_mode", "zeros") != "zeros":
            raise UsageError(f"{site}: quantized {cls} with padding_mode {m.padding_mode!r} is not supported")
        transposed = "Transpose" in cls
        ndim = w_q.dim() - 2
        fn = _conv_fn(ndim, transposed, "ReLU" in cls, m.stride, m.padding, m.dilation, m.groups,
                      getattr(m, "output_padding", 0))
        return _Lowered(fn, site, out_spec, weight=w_q, bias=bias)
    if cls.startswith("Linear"):
        post: Callable[[torch.Tensor], torch.Tensor] | None = None
        if cls == "LinearReLU":
            post = F.relu
        elif cls == "LinearLeakyReLU":
            slope = float(getattr(m, "negative_slope", 0.01))
            post = lambda y: F.leaky_relu(y, slope)  # noqa: E731
        elif cls == "LinearTanh":
            post = torch.tanh
        return _Lowered(_linear_fn(post), site, out_spec, weight=w_q, bias=bias)
    raise UsageError(f"{site}: quantized module {cls} has no lowering in tiexport yet")


def _lower_unweighted(m: Any, cls: str, site: str, out_spec: QSpec | None) -> nn.Module | None:
    def act(f: Callable[[torch.Tensor], torch.Tensor]) -> _Lowered:
        return _Lowered(lambda _m, _w, x: f(x), site, out_spec)

    if cls == "LayerNorm":
        shape, eps = tuple(m.normalized_shape), float(m.eps)
        return _Lowered(lambda lm, _w, x: F.layer_norm(x, shape, lm.ln_weight, lm.bias, eps), site, out_spec,
                        bias=m.bias, params={"ln_weight": m.weight})
    if cls == "GroupNorm":
        groups, eps = int(m.num_groups), float(m.eps)
        return _Lowered(lambda lm, _w, x: F.group_norm(x, groups, lm.gn_weight, lm.bias, eps), site, out_spec,
                        bias=m.bias, params={"gn_weight": m.weight})
    if cls.startswith("InstanceNorm"):
        eps = float(m.eps)
        return _Lowered(lambda lm, _w, x: F.instance_norm(x, weight=lm.in_weight, bias=lm.bias, eps=eps), site,
                        out_spec, bias=m.bias, params={"in_weight": m.weight})
    if cls in ("BatchNorm2d", "BatchNorm3d", "BNReLU2d", "BNReLU3d"):
        eps, relu = float(m.eps), "ReLU" in cls
        return _Lowered(lambda lm, _w, x: (F.relu if relu else (lambda t: t))(F.batch_norm(
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


# -------------------------------------------------------------------------- FX: functional quantized ops


def _q_add_relu(a: Any, b: Any) -> Any:
    return F.relu(a + b)


def _q_mul_relu(a: Any, b: Any) -> Any:
    return F.relu(a * b)


# torch.ops.quantized.<name> -> (float function, number of leading arguments it takes); output scale/zero point
# arguments that follow are dropped (the probe recorded the output's parameters).
_QUANTIZED_FUNCTIONS: dict[str, tuple[Callable[..., Any], int]] = {
    "add": (operator.add, 2), "add_relu": (_q_add_relu, 2), "mul": (operator.mul, 2), "mul_relu": (_q_mul_relu, 2),
    "add_scalar": (operator.add, 2), "mul_scalar": (operator.mul, 2), "add_out": (operator.add, 2),
    "matmul": (torch.matmul, 2), "cat": (torch.cat, 2), "softmax": (torch.softmax, 2),
    "hardswish": (F.hardswish, 1), "sigmoid": (torch.sigmoid, 1), "relu6": (F.relu6, 1), "gelu": (F.gelu, 1),
    "leaky_relu": (F.leaky_relu, 2), "elu": (F.elu, 1), "hardtanh": (F.hardtanh, 3), "clamp": (torch.clamp, 3),
    "threshold": (F.threshold, 3), "layer_norm": (F.layer_norm, 5), "group_norm": (F.group_norm, 5),
    "instance_norm": (lambda x, w, b, eps: F.instance_norm(x, weight=w, bias=b, eps=eps), 4),
    "batch_norm": (lambda x, w, b, m, v, eps: F.batch_norm(x, m, v, w, b, False, 0.0, eps), 6),
    "batch_norm1d": (lambda x, w, b, m, v, eps: F.batch_norm(x, m, v, w, b, False, 0.0, eps), 6),
    "batch_norm2d": (lambda x, w, b, m, v, eps: F.batch_norm(x, m, v, w, b, False, 0.0, eps), 6),
    "batch_norm3d": (lambda x, w, b, m, v, eps: F.batch_norm(x, m, v, w, b, False, 0.0, eps), 6),
    "batch_norm2d_relu": (lambda x, w, b, m, v, eps: F.relu(F.batch_norm(x, m, v, w, b, False, 0.0, eps)), 6),
}
# Functional quantized conv/linear take packed weights; they become _Lowered modules.
_PACKED_FUNCTIONS = ("linear", "linear_relu", "conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu",
                     "conv3d_relu", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")

# Ops that only rearrange or view values: quantization passes through them, no Q/DQ after (tidl.md §2, last rows).
_VIEW_METHODS = frozenset({"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                           "unsqueeze", "expand", "chunk", "split", "size", "detach", "clone", "unflatten",
                           "view_as", "reshape_as", "t", "dequantize", "unbind"})
_VIEW_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                             torch.unsqueeze, operator.getitem, torch.chunk, torch.split, torch.t, torch.unbind})
_VIEW_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


def _is_quantized_function(target: Any) -> str | None:
    """The op name of a ``torch.ops.quantized.*`` target (packet or overload), else None."""
    qual = getattr(target, "_qualified_op_name", None) or getattr(getattr(target, "_schema", None), "name", None)
    if isinstance(qual, str) and qual.startswith("quantized::"):
        return qual.split("::", 1)[1]
    return None


def _is_quantize_call(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.quantize_per_tensor, torch.quantize_per_channel,
                               getattr(torch, "quantize_per_tensor_dynamic", None))
    return node.op == "call_method" and node.target in ("quantize_per_tensor", "quantize_per_channel")


def _is_dequantize_call(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is torch.dequantize
    return node.op == "call_method" and node.target == "dequantize"


def _is_view(node: torch.fx.Node, root: nn.Module) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), _VIEW_MODULES)
    return False


class _Probe(torch.fx.Interpreter):
    """Runs a converted GraphModule and records the quantization of every quantized tensor it produces."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.specs: dict[str, QSpec] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_quantized:
            self.specs[n.name] = spec_from_qtensor(out, n.name)
        return out


def _graph_is_quantized(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if _is_quantize_call(node) or (node.op == "call_function" and _is_quantized_function(node.target)):
            return True
        if node.op == "call_module":
            try:
                sub = gm.get_submodule(str(node.target))
            except AttributeError:
                continue
            if compat.module_kind(sub) != "float":
                return True
    return False


def lower_converted_graph(gm: torch.fx.GraphModule, args: tuple[Any, ...], prefix: str = "") -> torch.fx.GraphModule:
    """A new GraphModule computing ``gm`` in float with Q/DQ sites; ``gm`` itself and its float submodules are shared,
    not modified. ``args`` are ``gm``'s inputs for the probe run; ``prefix`` is ``gm``'s qualified name."""
    probe = _Probe(gm)
    with torch.no_grad(), compat.quiet_torch():
        probe.run(*args)
    specs = probe.specs
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    root: dict[str, Any] = {}
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    used |= {name for name, _ in gm.named_children()}

    def site_name(base: str) -> str:
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    def full(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def arg(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: env[n])

    def add_module(target: str, module: nn.Module, inputs: tuple[Any, ...]) -> torch.fx.Node:
        root[target] = module
        return graph.call_module(target, inputs)

    def requant(node: torch.fx.Node, value: torch.fx.Node, site: str) -> torch.fx.Node:
        """Q/DQ after ``value`` with what the converted model's output of ``node`` was quantized with; the site is
        named after the module (or FX node) whose output it quantizes."""
        spec = specs.get(node.name)
        if spec is None:
            return value
        return add_module(site_name(node.name), _QDQ(spec, full(site)), (value,))

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.target, default_value=node.args[0] if node.args else
                                          inspect.Signature.empty)
            env[node].meta = dict(node.meta)
        elif node.op == "output":
            graph.output(arg(node.args[0]))
        elif node.op == "get_attr":
            obj = _getattr_path(gm, str(node.target))
            if isinstance(obj, (torch.Tensor, nn.Module)):
                root[str(node.target)] = obj
                env[node] = graph.get_attr(str(node.target))
            else:  # packed params (ScriptObject): only the lowering below reads them, via the original graph
                env[node] = None
        elif _is_quantize_call(node):
            spec = specs.get(node.name)
            if spec is None:
                raise UsageError(f"{node.name}: quantize call whose output was not recorded")
            target = site_name(node.name)
            env[node] = add_module(target, _QDQ(spec, full(target)), (arg(node.args[0]),))
        elif _is_dequantize_call(node):
            env[node] = arg(node.args[0])
        elif node.op == "call_function" and (qname := _is_quantized_function(node.target)):
            env[node] = _lower_quantized_call(gm, node, qname, arg, specs, root, graph, site_name, full)
        elif node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            if compat.module_kind(sub) != "float":
                lowered = _lower_quantized_module(sub, full(str(node.target)), specs.get(node.name))
                env[node] = add_module(str(node.target), lowered, tuple(arg(a) for a in node.args))
            else:
                root[str(node.target)] = _lower_container(sub, full(str(node.target)))
                value = graph.call_module(str(node.target), arg(node.args), arg(node.kwargs))
                env[node] = value if _is_view(node, gm) else requant(node, value, str(node.target))
        else:  # call_function / call_method on float or quantized tensors: same op in float, Q/DQ if it was quantized
            value = graph.create_node(node.op, node.target, arg(node.args), arg(node.kwargs), name=node.name)
            env[node] = value if _is_view(node, gm) else requant(node, value, node.name)
    new = torch.fx.GraphModule(root, graph, class_name=f"{type(gm).__name__}Lowered")
    new.graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    new.recompile()
    new.training = False
    return new


def _has_quantized_descendant(m: nn.Module) -> bool:
    return any(compat.module_kind(c) != "float" for c in m.modules() if c is not m)


def _lower_container(m: nn.Module, name: str) -> nn.Module:
    """``m`` itself when it holds no quantized/reference module; else a shallow copy whose quantized children are
    lowered (a fused float ConvReLU2d holding a reference Conv2d after ``convert_to_reference_fx``). The user's
    module is not modified."""
    if not _has_quantized_descendant(m):
        return m
    new = copy.copy(m)
    new.__dict__["_modules"] = dict(m._modules)
    for child_name, child in m._modules.items():
        if child is None:
            continue
        qual = f"{name}.{child_name}" if name else child_name
        if compat.module_kind(child) != "float":
            new._modules[child_name] = _lower_quantized_module(child, qual, None)
        elif _has_quantized_descendant(child):
            new._modules[child_name] = _lower_container(child, qual)
    return new


def _lower_quantized_call(gm: torch.fx.GraphModule, node: torch.fx.Node, qname: str, arg: Callable[[Any], Any],
                          specs: dict[str, QSpec], root: dict[str, Any], graph: torch.fx.Graph,
                          site_name: Callable[[str], str], full: Callable[[str], str]) -> torch.fx.Node:
    spec = specs.get(node.name)
    if qname in _PACKED_FUNCTIONS:
        packed = _getattr_path(gm, str(node.args[1].target)) if isinstance(node.args[1], torch.fx.Node) else None
        if packed is None:
            raise UsageError(f"{node.name}: quantized.{qname} without packed weights")
        w_q, bias = packed.unpack()
        target = site_name(node.name)
        if qname.startswith("linear"):
            lowered = _Lowered(_linear_fn(F.relu if qname.endswith("relu") else None), full(target), spec,
                               weight=w_q, bias=bias)
        else:
            transposed = "transpose" in qname
            lowered = _Lowered(_conv_fn(w_q.dim() - 2, transposed, qname.endswith("relu"), packed.stride(),
                                        packed.padding(), packed.dilation(), packed.groups(),
                                        packed.output_padding() if transposed else 0),
                               full(target), spec, weight=w_q, bias=bias)
        root[target] = lowered
        return graph.call_module(target, (arg(node.args[0]),))
    if qname not in _QUANTIZED_FUNCTIONS:
        raise UsageError(f"{node.name}: torch.ops.quantized.{qname} has no lowering in tiexport yet; export the "
                         "fake-quant model (before convert_fx) instead")
    fn, nargs = _QUANTIZED_FUNCTIONS[qname]
    args = tuple(arg(a) for a in node.args[:nargs])
    kwargs = {k: arg(v) for k, v in node.kwargs.items() if k not in ("scale", "zero_point", "output_scale",
                                                                       "output_zero_point")}
    value = graph.call_function(fn, args, kwargs)
    if spec is None:
        return value
    target = site_name(node.name)
    root[target] = _QDQ(spec, full(target))
    return graph.call_module(target, (value,))


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# -------------------------------------------------------------------------------------------- the context manager


@dataclass
class _State:
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list)
    forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    temp_buffers: list[tuple[nn.Module, str]] = field(default_factory=list)
    swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)


_MISSING = object()


class ExportLowering:
    """``with ExportLowering(model, args) as export_model:`` — see the module docstring. ``warnings`` collects
    user-facing notes (restricted ranges, disabled fake-quants, conversions made); ``sites`` counts what was done."""

    def __init__(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        self.model = model
        self.args = args
        self.warnings: list[str] = []
        self.fake_quant_sites: dict[str, QSpec | None] = {}
        self.kind = "float"
        self._state = _State()

    # -- entry / exit ------------------------------------------------------------------------------------------------
    def __enter__(self) -> nn.Module:
        try:
            return self._enter()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _enter(self) -> nn.Module:
        model = self.model
        classes = compat.ao_classes()
        fq_types, obs_types = classes["fake_quant"], classes["observer"]
        self._set_eval(model)
        fake_quants = [(n, m) for n, m in model.named_modules() if fq_types and isinstance(m, fq_types)]
        fq_children = {id(c) for _, fq in fake_quants for c in fq.modules()}
        observers = [n for n, m in model.named_modules()
                     if obs_types and isinstance(m, obs_types) and id(m) not in fq_children]
        converted = self._is_converted(model)
        if observers and not fake_quants and not converted:
            model = self._convert_observed(model, observers)
            converted = True
        if fake_quants:
            self.kind = "fake_quant"
            self._patch_fake_quants(fake_quants)
            self._fold_conv_bn(model, classes)
        if converted:
            self.kind = "converted" if not fake_quants else "mixed"
            model = self._lower_converted(model)
        if self.kind == "float":
            self.warnings.append("the model has no fake-quant, observer or quantized module: exported as a float "
                                 "model, which TIDL would calibrate itself (prequantized_model: 1 has nothing to read)")
        return model

    def _set_eval(self, model: nn.Module) -> None:
        for m in model.modules():
            self._state.modes.append((m, m.training))
            m.training = False

    def _restore(self) -> None:
        st = self._state
        for parent, attr, original in reversed(st.swaps):
            setattr(parent, attr, original)
        for m, fwd in reversed(st.forwards):
            if fwd is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd
        for m, name in reversed(st.temp_buffers):
            m._buffers.pop(name, None)
        for m, name, value in reversed(st.buffers):
            getattr(m, name).copy_(value)
        for m, mode in reversed(st.modes):
            m.training = mode
        self._state = _State()

    # -- fake-quant models --------------------------------------------------------------------------------------------
    def _patch_fake_quants(self, fake_quants: list[tuple[str, Any]]) -> None:
        restricted: dict[tuple[int, int], list[str]] = defaultdict(list)
        disabled: list[str] = []
        never_observed: list[str] = []
        for name, fq in fake_quants:
            for flag in ("observer_enabled", "fake_quant_enabled", "learning_enabled", "static_enabled"):
                buf = getattr(fq, flag, None)
                if isinstance(buf, torch.Tensor):
                    self._state.buffers.append((fq, flag, buf.detach().clone()))
            if hasattr(fq, "disable_observer"):
                fq.disable_observer()
            for flag in ("observer_enabled", "learning_enabled", "static_enabled"):
                buf = getattr(fq, flag, None)  # set directly too: a subclass may not route these through methods
                if isinstance(buf, torch.Tensor):
                    buf.fill_(0)
            spec = spec_from_fake_quant(fq, name)
            self.fake_quant_sites[name] = spec
            if spec is None:
                disabled.append(name)
            else:
                if not spec.full_range:
                    restricted[(spec.quant_min, spec.quant_max)].append(name)
                obs = getattr(fq, "activation_post_process", None)
                min_val = getattr(obs, "min_val", None)
                if isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or bool(torch.isinf(min_val).all())):
                    never_observed.append(name)
            self._patch_forward(fq, _fake_quant_forward(spec, name))
        for (lo, hi), sites in sorted(restricted.items()):
            bits = max(1, math.ceil(math.log2(hi - lo + 1)))
            self.warnings.append(
                f"{len(sites)} fake-quant site(s) use the restricted integer range [{lo}, {hi}] ({bits}-bit: "
                f"{_few(sites)}): exported as 8-bit Q/DQ with that range enforced (weights stored within it, "
                "activations clipped), but TIDL's prequantized import takes 8-bit only and reads the full "
                "int8/uint8 range (tidl.md §2); TIDL will not reproduce the narrower quantization")
        if disabled:
            self.warnings.append(f"{len(disabled)} fake-quant module(s) have fake-quant disabled and export without "
                                 f"Q/DQ: {_few(disabled)}")
        if never_observed:
            self.warnings.append(f"{len(never_observed)} fake-quant module(s) never observed data (calibrate or "
                                 f"train first); exported with their initial scale: {_few(never_observed)}")

    def _patch_forward(self, m: nn.Module, fwd: Callable[..., Any]) -> None:
        self._state.forwards.append((m, m.__dict__.get("forward", _MISSING)))
        m.forward = fwd

    def _fold_conv_bn(self, model: nn.Module, classes: dict[str, Any]) -> None:
        conv_bn, conv_bn_relu = classes["conv_bn_qat"], classes["conv_bn_relu_qat"]
        if not conv_bn:
            return
        for name, m in model.named_modules():
            if not isinstance(m, conv_bn):
                continue
            bn = m.bn
            if bn.running_var is None or bn.running_mean is None:
                continue  # no running statistics to fold: keep the module's own forward
            with torch.no_grad():
                factor, bias = compat.conv_bn_folding(m)
                weight = m.weight * factor.reshape([-1] + [1] * (m.weight.dim() - 1))
            for buf_name, value in (("folded_weight", weight), ("folded_bias", bias)):
                if hasattr(m, buf_name):
                    raise UsageError(f"{name}: {type(m).__name__} already has an attribute {buf_name!r}")
                m.register_buffer(buf_name, value.detach().clone())
                self._state.temp_buffers.append((m, buf_name))
            self._patch_forward(m, _conv_bn_forward(m, isinstance(m, conv_bn_relu) if conv_bn_relu else False))

    # -- converted / observed models ---------------------------------------------------------------------------------
    @staticmethod
    def _is_converted(model: nn.Module) -> bool:
        for m in model.modules():
            if compat.module_kind(m) != "float":
                return True
            if isinstance(m, torch.fx.GraphModule) and _graph_is_quantized(m):
                return True
        return False

    def _convert_observed(self, model: nn.Module, observers: list[str]) -> nn.Module:
        is_fx = any(isinstance(m, torch.fx.GraphModule) for m in model.modules())
        try:
            converted = compat.convert_observed(copy.deepcopy(model), is_fx)
        except Exception as exc:
            raise UsageError(f"the model has observers ({_few(observers)}) but no fake-quant: it is calibrated, not "
                             f"converted, and converting a copy failed ({type(exc).__name__}: {exc}); call "
                             "convert_fx()/convert() yourself and export the result") from exc
        self.warnings.append(f"the model is calibrated but not converted ({len(observers)} observers): exported "
                             f"the result of {'convert_fx' if is_fx else 'convert'} on a copy")
        self._set_eval(converted)
        return converted

    def _lower_converted(self, model: nn.Module) -> nn.Module:
        graphs = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, torch.fx.GraphModule) and _graph_is_quantized(m)]
        top = [(n, m) for n, m in graphs if not any(n != o and (o == "" or n.startswith(o + ".")) for o, _ in graphs)]
        captured: dict[str, tuple[Any, ...]] = {}
        eager_specs: dict[str, list[QSpec | None]] = defaultdict(list)
        func_specs: dict[str, dict[str, QSpec]] = defaultdict(dict)
        hooks = []
        inside_graph = {id(s) for _, g in top for s in g.modules()}
        for name, gm in top:
            hooks.append(gm.register_forward_pre_hook(_capture(captured, name)))
        restores: list[tuple[nn.Module, str]] = []
        # children of a quantized module (nnq.Linear's packed params) are its internals, not separate layers
        internals = {id(c) for m in model.modules() if compat.module_kind(m) != "float"
                     for c in m.modules() if c is not m}
        for name, m in model.named_modules():
            if id(m) in inside_graph or id(m) in internals or m is model:
                continue
            if type(m).__name__ == "QFunctional":
                for op in ("add", "add_relu", "mul", "mul_relu", "add_scalar", "mul_scalar", "cat", "matmul"):
                    if hasattr(m, op):
                        setattr(m, op, _record_method(getattr(m, op), func_specs[name], op, name))
                        restores.append((m, op))
            elif compat.module_kind(m) != "float" or not list(m.children()):
                hooks.append(m.register_forward_hook(_record_output(eager_specs, name)))
        try:
            with torch.no_grad(), compat.quiet_torch():
                model(*self.args)
        finally:
            for h in hooks:
                h.remove()
            for m, op in restores:
                m.__dict__.pop(op, None)
        for name, gm in top:
            if name not in captured:
                raise UsageError(f"the converted FX graph {name or '<root>'} did not run on the example inputs")
            lowered = lower_converted_graph(gm, captured[name], prefix=name)
            if name == "":
                return lowered
            self._swap(model, name, lowered)
        for name, m in list(model.named_modules()):
            if id(m) in inside_graph or id(m) in internals or name == "":
                continue
            if type(m).__name__ == "QFunctional":
                self._swap(model, name, _LoweredFunctional(func_specs.get(name, {}), name))
                continue
            specs = eager_specs.get(name)
            if specs is None:
                continue
            distinct = {s for s in specs}
            if len(distinct) > 1:
                raise UsageError(f"module {name!r} runs more than once with different quantization; give each use "
                                 "its own module")
            spec = next(iter(distinct)) if distinct else None
            kind = compat.module_kind(m)
            if kind != "float":
                self._swap(model, name, _lower_quantized_module(m, name, spec))
            elif spec is not None and not isinstance(m, _VIEW_MODULES):
                self._swap(model, name, _Requant(m, spec, name))
        return model

    def _swap(self, model: nn.Module, name: str, new: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        self._state.swaps.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)


def _fake_quant_forward(spec: QSpec | None, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if spec is None:
        return lambda x: x

    def forward(x: torch.Tensor) -> torch.Tensor:
        return qdq(x, spec, name)

    return forward


def _conv_bn_forward(m: Any, relu: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = m.weight_fake_quant(m.folded_weight)
        y = m._conv_forward(x, w, m.folded_bias)
        return F.relu(y) if relu else y

    return forward


def _capture(store: dict[str, tuple[Any, ...]], name: str) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        store.setdefault(name, args)

    return hook


def _record_output(store: dict[str, list[QSpec | None]], name: str) -> Callable[..., None]:
    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            store[name].append(spec_from_qtensor(out, name) if out.is_quantized else None)

    return hook


def _record_method(fn: Callable[..., Any], store: dict[str, QSpec], op: str, name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_quantized:
            store[op] = spec_from_qtensor(out, f"{name}.{op}")
        return out

    return wrapper


def _few(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")

