"""What a prepared model leaves unfolded or float, named by module, so the wrappers can say so at wrap time.

torch.ao quantizes what its patterns match and leaves the rest float without a word: a batch norm computed by
``F.batch_norm`` inside a module's forward (a ``BatchNorm2d`` subclass the wrapper could not swap) stays a
separate op with the training flag of the moment baked in; an opaque function (``scaled_dot_product_attention``
not looked up on ``torch.nn.functional``) or a leaf module without a fake-quant after it exports as a float island
that TIDL runs without quantization parameters or hands to Arm. :func:`unquantized_parts` finds them in the
prepared GraphModule.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule, Node

__all__ = ["unquantized_parts"]

_BATCH_NORM_FUNCTIONS = {torch.nn.functional.batch_norm, torch.batch_norm}
_OPAQUE_FUNCTIONS = {torch._C._nn.scaled_dot_product_attention: "scaled_dot_product_attention"}
# leaf modules whose output needs no fake-quant of its own (they pass values through or share their input's)
_NO_OUTPUT_QUANT = (
    torch.nn.Dropout, torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.MaxPool1d,
    torch.nn.MaxPool2d, torch.nn.ReLU, torch.nn.ReLU6,
)
_PASS_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "squeeze", "unsqueeze",
                 "chunk", "split", "unbind", "expand", "view_as", "reshape_as"}
_PASS_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.chunk, torch.split, torch.unbind}


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        return str(path[0] if isinstance(path, tuple) else path) or node.name
    return node.name


def _reaches_fake_quant(node: Node, modules: dict[str, Any], depth: int = 0) -> bool:
    for user in node.users:
        if user.op == "call_module" and isinstance(modules.get(str(user.target)), FakeQuantizeBase):
            return True
        passes = (user.op == "call_method" and user.target in _PASS_METHODS) or (
            user.op == "call_function" and user.target in _PASS_FUNCTIONS)
        if depth < 8 and passes and _reaches_fake_quant(user, modules, depth + 1):
            return True
    return False


def unquantized_parts(prepared: GraphModule) -> dict[str, str]:
    """Qualified module name -> what stays unfolded or float there, for a model prepared with fake-quants."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    found: dict[str, str] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
            found.setdefault(_module_path(node), "batch norm computed in its forward (F.batch_norm): not folded into "
                             "the convolution, float, its training flag fixed at trace time")
        elif node.op == "call_function" and node.target in _OPAQUE_FUNCTIONS:
            found.setdefault(_module_path(node), f"{_OPAQUE_FUNCTIONS[node.target]} stays float (call it as "
                             "torch.nn.functional.scaled_dot_product_attention to have it quantized)")
        elif node.op == "call_module":
            module = modules.get(str(node.target))
            if module is None or isinstance(module, (FakeQuantizeBase, *_NO_OUTPUT_QUANT)):
                continue
            if type(module).__module__.startswith(("torch.ao.", "torch.nn.intrinsic", "torch.nn.qat")):
                continue  # torch.ao's fused and QAT modules carry their own weight fake-quant
            if any(u.op == "output" for u in node.users):
                continue  # a float network output is fine: TIDL's output conversion takes it
            if not _reaches_fake_quant(node, modules):
                found.setdefault(str(node.target), f"{type(module).__name__} has no fake-quant after it: a float "
                                 "island in the export")
    return found
