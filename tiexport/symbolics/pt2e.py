"""Lowering of converted PT2E models (torchao ``convert_pt2e``) to ``tiexport::quantize_dequantize`` sites.

``convert_pt2e`` writes every quantization point as ``quantized_decomposed.quantize_per_tensor`` followed by one or
more ``dequantize_per_tensor`` (one per consumer, torchao's DuplicateDQPass), and every weight as an int8 constant
(``fold_quantize``) read by ``dequantize_per_channel`` / ``dequantize_per_tensor``. :func:`lower_pt2e_graph` builds
a new GraphModule (the converted one is not modified) in which each such pair, and each weight's dequantize, is
one ``tiexport::quantize_dequantize`` call with the same parameters, so both exporters write the same QDQ form as for
fake-quant models: activations ``QuantizeLinear -> DequantizeLinear``, weights an int8 initializer behind a
``DequantizeLinear``.

Names: a site is named after the fake-quant (or observer) module it was converted from (convert_pt2e records that
node in ``from_node`` metadata: ``activation_post_process_3``, or the name tiexport's PT2E wrappers gave it), so a
prepared model and its converted model export to the same node names; the FX node's own name otherwise.
"""

from __future__ import annotations

import logging
from typing import Any, TypeGuard

import torch
from torch.fx import Graph, GraphModule, Node

from tiexport.errors import UsageError
from tiexport.symbolics.ops import QSpec

__all__ = ["is_pt2e_converted", "lower_pt2e_graph"]

log = logging.getLogger(__name__)


def _decomposed() -> Any:
    return getattr(torch.ops, "quantized_decomposed", None)


def _ops(*names: str) -> set[Any]:
    ns = _decomposed()
    found: set[Any] = set()
    if ns is None:
        return found
    for name in names:
        packet = getattr(ns, name, None)
        for overload in ("default", "tensor", "tensor2"):
            if packet is not None and hasattr(packet, overload):
                found.add(getattr(packet, overload))
    return found


def is_pt2e_converted(model: torch.nn.Module) -> TypeGuard[GraphModule]:
    """The model (a GraphModule) computes with ``quantized_decomposed`` quantize/dequantize ops (convert_pt2e)."""
    if not isinstance(model, GraphModule):
        return False
    targets = _ops("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel")
    return any(n.op == "call_function" and n.target in targets for n in model.graph.nodes)


def _source_name(node: Node) -> str:
    """The observer / fake-quant node a convert_pt2e node was made from (``from_node`` metadata), else its name."""
    for source in node.meta.get("from_node", []) or []:
        # a call_module source's target is the module's qualified name (renamed by tiexport's wrappers); its node
        # name stays the one prepare gave it
        for name in (getattr(source, "target", None), getattr(source, "name", None)):
            if isinstance(name, str) and name and not name.startswith("<"):
                return name
    return node.name


def _number(value: Any, what: str, node: Node) -> Any:
    if isinstance(value, Node):
        raise UsageError(f"{node.name}: the {what} of a PT2E quantize/dequantize is computed at run time; tiexport "
                         "exports static quantization (convert_pt2e of a calibrated model)")
    return value


def lower_pt2e_graph(gm: GraphModule) -> GraphModule:
    """A new GraphModule computing ``gm`` in float with one ``qdq`` site per quantization point (module docstring)."""
    q_tensor = _ops("quantize_per_tensor")
    dq_tensor = _ops("dequantize_per_tensor")
    dq_channel = _ops("dequantize_per_channel")
    graph = Graph()
    env: dict[Node, Any] = {}
    root: dict[str, Any] = {}
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name in used:
        root[name] = _resolve(gm, name)
    # a shared fake-quant's later sites keep its name: the exporters number them (``<q>/QuantizeLinear_1``)
    weight_index = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in q_tensor:
            x, scale, zero_point, qmin, qmax = (node.args + (None,) * 6)[:5]
            spec = QSpec((float(_number(scale, "scale", node)),), (int(_number(zero_point, "zero point", node)),),
                         int(qmin), int(qmax))
            env[node] = _site(graph, env[x], spec, _source_name(node))
            continue
        if node.op == "call_function" and (node.target in dq_tensor or node.target in dq_channel):
            source = node.args[0]
            if isinstance(source, Node) and source.op == "call_function" and source.target in q_tensor:
                env[node] = env[source]  # the pair is one site: its qdq already stands for both
                continue
            if not (isinstance(source, Node) and source.op == "get_attr"):
                raise UsageError(f"{node.name}: a PT2E dequantize reads neither a quantize nor a constant; tiexport "
                                 "exports convert_pt2e's Q/DQ form")
            ints = _resolve(gm, str(source.target))
            if node.target in dq_channel:
                scale_t = _tensor_arg(gm, node.args[1])
                zp_t = _tensor_arg(gm, node.args[2])
                axis, qmin, qmax = int(node.args[3]), int(node.args[4]), int(node.args[5])
                shape = [1] * ints.dim()
                shape[axis] = -1
                weight = (ints.float() - zp_t.reshape(shape).float()) * scale_t.reshape(shape).float()
                spec = QSpec(tuple(float(s) for s in scale_t.reshape(-1)),
                             tuple(int(z) for z in zp_t.reshape(-1)), qmin, qmax, axis)
            else:
                scale_v = float(_number(node.args[1], "scale", node))
                zp_v = int(_number(node.args[2], "zero point", node))
                qmin, qmax = int(node.args[3]), int(node.args[4])
                weight = (ints.float() - zp_v) * scale_v
                spec = QSpec((scale_v,), (zp_v,), qmin, qmax)
            attr = f"_tiexport_pt2e_weight_{weight_index}"
            weight_index += 1
            root[attr] = weight.detach()
            value = graph.get_attr(attr)
            env[node] = _site(graph, value, spec, _source_name(node))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    lowered = GraphModule(_Root(root), graph, class_name="PT2ELowered")
    lowered.train(False)
    for name, value in root.items():
        if isinstance(value, torch.Tensor) and name.startswith("_tiexport_pt2e_weight_"):
            lowered.register_buffer(name, value)
    return lowered


def _site(graph: Graph, value: Node, spec: QSpec, name: str) -> Node:
    """One ``tiexport::quantize_dequantize`` call (plain list/int/str arguments, as FX code generation needs)."""
    axis = -1 if spec.axis is None else spec.axis
    return graph.call_function(torch.ops.tiexport.quantize_dequantize.default, (
        value, list(spec.scale), list(spec.zero_point), axis, spec.quant_min, spec.quant_max, name))


class _Root(torch.nn.Module):
    """A root for GraphModule built from a flat ``{qualified name: module or tensor}`` dict."""

    def __init__(self, items: dict[str, Any]) -> None:
        super().__init__()
        for name, value in items.items():
            parent: torch.nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                child = parent._modules.get(part)
                if child is None:
                    child = torch.nn.Module()
                    parent.add_module(part, child)
                parent = child
            if isinstance(value, torch.nn.Module):
                parent.add_module(leaf, value)
            elif isinstance(value, torch.nn.Parameter):
                parent.register_parameter(leaf, value)
            elif isinstance(value, torch.Tensor):
                parent.register_buffer(leaf, value)
            else:
                setattr(parent, leaf, value)


def _resolve(gm: GraphModule, name: str) -> Any:
    value: Any = gm
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _tensor_arg(gm: GraphModule, value: Any) -> torch.Tensor:
    if isinstance(value, Node) and value.op == "get_attr":
        return torch.as_tensor(_resolve(gm, str(value.target)))
    if isinstance(value, Node):
        raise UsageError(f"{value.name}: per-channel quantization parameters computed at run time cannot be exported")
    return torch.as_tensor(value)
