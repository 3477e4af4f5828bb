"""Shape arithmetic of a traced model as constants, so the export has no run-time shape computation.

torch.fx traces ``x.shape``, ``x.size(0)`` and the integer arithmetic on them as graph nodes (timm's
``B, N, C = x.shape`` before a reshape, a class token ``expand(x.shape[0], -1, -1)``, an ``interpolate`` to
``x.shape[-2:]``). The exporters write those as ``Shape -> Gather -> Concat`` feeding a ``Reshape``, ``Expand``,
``Slice`` or ``Resize``: TIDL needs those parameters constant (run-time shapes, ``Shape``, ``Expand`` run on Arm,
and a shape it cannot infer is an import error). The export's input shapes are static, so every such value is
known: :func:`specialize_shapes` runs the GraphModule once on the example inputs and gives the exporter a copy of
its graph in which every node that computed a Python number, ``torch.Size`` or tuple of numbers is that constant.
Ops whose TorchScript translation computes shapes at run time get their static form too: ``expand`` to its own
shape (a class token at batch 1) is dropped and other ``expand`` calls get explicit sizes; ``flatten`` and
``unflatten`` become a ``reshape`` to the recorded shape; ``interpolate`` to a ``size`` that is a whole multiple
of the input's becomes that ``scale_factor`` (the same sampling positions; ``Resize`` with constant scales); a
permute or transpose is followed by ``.contiguous()`` (see :func:`_dense_after_permute`).
The model itself is not changed (the copy shares its submodules).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

__all__ = ["specialize_shapes"]

log = logging.getLogger(__name__)


def _is_shape_value(value: Any) -> bool:
    if isinstance(value, bool | int | float) and not isinstance(value, torch.Tensor):
        return True
    if isinstance(value, torch.Size):
        return True
    return isinstance(value, tuple | list) and bool(value) and all(
        isinstance(v, bool | int | float) for v in value)


_EXPAND_METHODS = {"expand", "expand_as"}
_FLATTEN = {"flatten", "unflatten", torch.flatten, torch.unflatten}
_INTERPOLATE = {torch.nn.functional.interpolate}


def _kind(n: Node) -> str | None:
    if n.op == "call_method" and n.target in _EXPAND_METHODS:
        return "expand"
    if n.op in ("call_method", "call_function") and n.target in _FLATTEN:
        return "flatten"
    if n.op == "call_function" and n.target in _INTERPOLATE:
        return "interpolate"
    return None


class _Recorder(Interpreter):
    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self.values: dict[Node, Any] = {}
        self.shapes: dict[Node, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        """expand/flatten/interpolate nodes: (input shape, output shape)."""

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if n.op in ("call_function", "call_method") and _is_shape_value(result):
            self.values[n] = tuple(result) if isinstance(result, torch.Size | list) else result
        elif _kind(n) is not None and isinstance(result, torch.Tensor) and n.args:
            inp = self.env.get(n.args[0]) if isinstance(n.args[0], Node) else None
            if isinstance(inp, torch.Tensor):
                self.shapes[n] = (tuple(inp.shape), tuple(result.shape))
        return result


def _static_form(graph: torch.fx.Graph, node: Node, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """Rewrite one expand/flatten/interpolate node of ``graph`` into its static form, in place."""
    kind = _kind(node)
    src = node.args[0]
    in_shape, out_shape = shapes
    if kind == "expand":
        if in_shape == out_shape:
            node.replace_all_uses_with(src)  # type: ignore[arg-type]
            graph.erase_node(node)
        else:
            node.target, node.args, node.kwargs = "expand", (src, *out_shape), {}
    elif kind == "flatten":
        with graph.inserting_before(node):
            new = graph.call_method("reshape", (src, out_shape))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif kind == "interpolate" and node.kwargs.get("size") is not None and len(in_shape) == len(out_shape) > 2:
        factors = [o / i for i, o in zip(in_shape[2:], out_shape[2:], strict=True)]
        if all(f.is_integer() and f >= 1 for f in factors):
            kwargs = dict(node.kwargs)
            kwargs["size"] = None
            kwargs["scale_factor"] = tuple(factors)
            node.kwargs = kwargs


_PERMUTES = {"permute", "transpose", torch.permute, torch.transpose}


def _dense_after_permute(graph: torch.fx.Graph) -> None:
    """``.contiguous()`` after every permute/transpose: torch.export keeps the permuted strides, and the dynamo
    exporter then restores them after ops such as adaptive average pooling with ``as_strided`` (an ONNX Gather
    with 4-D indices, which TIDL runs on Arm, between the pooling and its fake-quant). In ONNX it is nothing."""
    for node in list(graph.nodes):
        if node.op in ("call_method", "call_function") and node.target in _PERMUTES:
            users = [u for u in node.users if not (u.op == "call_method" and u.target == "contiguous")]
            if not users:
                continue
            with graph.inserting_after(node):
                dense = graph.call_method("contiguous", (node,))
            for user in users:
                user.replace_input_with(node, dense)


def specialize_shapes(model: Any, args: tuple[Any, ...]) -> Any:
    """``model`` with its shape computations on ``args`` made constants (see the module docstring): a new
    GraphModule sharing ``model``'s submodules, or ``model`` itself when it is no GraphModule or computes no
    shapes."""
    if not isinstance(model, GraphModule):
        return model
    recorder = _Recorder(model)
    try:
        with torch.no_grad():
            recorder.run(*args)
    except Exception as exc:  # the exporter reports what is wrong with the model itself
        log.debug("shape specialization skipped: %s", exc)
        return model
    if not recorder.values and not recorder.shapes:
        return model
    graph = torch.fx.Graph()
    val_map: dict[Node, Node] = {}
    out = graph.graph_copy(model.graph, val_map)
    graph.output(out)
    constants = {val_map[n]: v for n, v in recorder.values.items()}
    for node in graph.nodes:
        if node in constants:
            continue
        node.args = map_arg(node.args, lambda a: constants.get(a, a))
        node.kwargs = map_arg(node.kwargs, lambda a: constants.get(a, a))
    for node in reversed(list(graph.nodes)):
        if node in constants and not node.users:
            graph.erase_node(node)
    for old, shapes in recorder.shapes.items():
        _static_form(graph, val_map[old], shapes)
    _dense_after_permute(graph)
    graph.lint()
    specialized = GraphModule(model, graph, class_name=type(model).__name__)
    log.debug("export: %d shape computation(s) made constants, %d shape op(s) made static", len(constants),
              len(recorder.shapes))
    return specialized
