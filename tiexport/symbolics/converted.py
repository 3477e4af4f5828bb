"""FX rewriting of converted models (``convert_fx``, ``convert_to_reference_fx``): a probe run records every
quantized tensor's parameters, then ``quantize_per_tensor -> Q/DQ``, ``dequantize -> nothing``, quantized
functional ops -> float op + Q/DQ, quantized modules -> :mod:`tiexport.symbolics.modules`, and float ops on
quantized tensors -> the op + Q/DQ with the same parameters (what TIDL needs around those layers, tidl.md §2),
except pure view ops."""

from __future__ import annotations

import copy
import inspect
import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tiexport import compat
from tiexport.errors import UsageError
from tiexport.symbolics.modules import QDQ, Lowered, conv_fn, linear_fn, lower_quantized_module
from tiexport.symbolics.ops import QSpec
from tiexport.symbolics.specs import spec_from_qtensor

__all__ = [
    "VIEW_MODULES",
    "graph_is_quantized",
    "has_quantized_descendant",
    "lower_container",
    "lower_converted_graph",
]

log = logging.getLogger(__name__)


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
# Functional quantized conv/linear take packed weights; they become Lowered modules.
_PACKED_FUNCTIONS = ("linear", "linear_relu", "conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu",
                     "conv3d_relu", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")

# Ops that only rearrange or view values: quantization passes through them, no Q/DQ after (tidl.md §2, last rows).
_VIEW_METHODS = frozenset({"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                           "unsqueeze", "expand", "chunk", "split", "size", "detach", "clone", "unflatten",
                           "view_as", "reshape_as", "t", "dequantize", "unbind"})
_VIEW_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                             torch.unsqueeze, operator.getitem, torch.chunk, torch.split, torch.t, torch.unbind})
VIEW_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


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
        return isinstance(root.get_submodule(str(node.target)), VIEW_MODULES)
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


def graph_is_quantized(gm: torch.fx.GraphModule) -> bool:
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
        return add_module(site_name(node.name), QDQ(spec, full(site)), (value,))

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
            env[node] = add_module(target, QDQ(spec, full(target)), (arg(node.args[0]),))
        elif _is_dequantize_call(node):
            env[node] = arg(node.args[0])
        elif node.op == "call_function" and (qname := _is_quantized_function(node.target)):
            env[node] = _lower_quantized_call(gm, node, qname, arg, specs, root, graph, site_name, full)
        elif node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            if compat.module_kind(sub) != "float":
                lowered = lower_quantized_module(sub, full(str(node.target)), specs.get(node.name))
                env[node] = add_module(str(node.target), lowered, tuple(arg(a) for a in node.args))
            else:
                root[str(node.target)] = lower_container(sub, full(str(node.target)))
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


def has_quantized_descendant(m: nn.Module) -> bool:
    return any(compat.module_kind(c) != "float" for c in m.modules() if c is not m)


def lower_container(m: nn.Module, name: str) -> nn.Module:
    """``m`` itself when it holds no quantized/reference module; else a shallow copy whose quantized children are
    lowered (a fused float ConvReLU2d holding a reference Conv2d after ``convert_to_reference_fx``). The user's
    module is not modified."""
    if not has_quantized_descendant(m):
        return m
    new = copy.copy(m)
    new.__dict__["_modules"] = dict(m._modules)
    for child_name, child in m._modules.items():
        if child is None:
            continue
        qual = f"{name}.{child_name}" if name else child_name
        if compat.module_kind(child) != "float":
            new._modules[child_name] = lower_quantized_module(child, qual, None)
        elif has_quantized_descendant(child):
            new._modules[child_name] = lower_container(child, qual)
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
            lowered = Lowered(linear_fn(F.relu if qname.endswith("relu") else None), full(target), spec,
                               weight=w_q, bias=bias)
        else:
            transposed = "transpose" in qname
            lowered = Lowered(conv_fn(w_q.dim() - 2, transposed, qname.endswith("relu"), packed.stride(),
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
    root[target] = QDQ(spec, full(target))
    return graph.call_module(target, (value,))


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj

