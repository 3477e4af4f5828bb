"""ONNX shape inference that cannot take the process down, run on a weight-free skeleton of the model.

TIDL resolves every tensor's shape with ONNX shape inference (tidl.md §2), so rules and passes both run it: the
validators' :class:`~tiexport.context.ModelContext` on a ModelProto, the fix pipeline's
:class:`~tiexport.passes.static_shapes.InferShapesPass` on an onnx-graphsurgeon graph. Both build the same
:func:`skeleton`: every initializer above :data:`SMALL_INITIALIZER` elements (or stored as external data) becomes a
typed graph input, so inference costs the same for a 100 MB model as for a 1 MB one and never reads weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["SMALL_INITIALIZER", "SkeletonConstant", "infer_shapes", "skeleton"]

SMALL_INITIALIZER = 64
"""Elements; larger initializers become typed graph inputs in the skeleton (small ones carry shape values)."""


@dataclass(frozen=True)
class SkeletonConstant:
    """An initializer as the skeleton sees it: its type and dims, and how to get its proto when it is small."""

    name: str
    elem_type: int
    dims: tuple[int, ...]
    proto: onnx.TensorProto | Callable[[], onnx.TensorProto] | None
    """The TensorProto, or a function that builds it (called only for small constants); None when its data must not
    be read (external data)."""


def skeleton(
    *,
    name: str,
    nodes: Iterable[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Iterable[onnx.ValueInfoProto],
    constants: Iterable[SkeletonConstant],
    ir_version: int,
    opset_import: Iterable[onnx.OperatorSetIdProto],
    value_info: Iterable[onnx.ValueInfoProto] = (),
    functions: Iterable[onnx.FunctionProto] = (),
) -> onnx.ModelProto:
    """A model of ``nodes`` for shape inference: small constants kept, the others typed graph inputs."""
    graph = onnx.GraphProto(name=name)
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    graph.value_info.extend(value_info)
    declared = {vi.name for vi in inputs}
    for c in constants:
        size = int(np.prod(c.dims, dtype=np.float64)) if c.dims else 1
        if size <= SMALL_INITIALIZER and c.proto is not None:
            graph.initializer.append(c.proto if isinstance(c.proto, onnx.TensorProto) else c.proto())
        elif c.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(c.name, c.elem_type, list(c.dims)))
    model = onnx.ModelProto(ir_version=ir_version, graph=graph)
    model.opset_import.extend(opset_import)
    model.functions.extend(functions)
    return model


_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
_MAX_SHAPE_VALUES = 2**20
"""Integer tensors with more elements than this are never shape values; data propagation would materialize them."""


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (no type check, not strict, with data propagation) that cannot take the process down.

    Two inputs make onnx's C++ inference do that rather than raise, so they are made unknown first, on a copy
    (``model`` is never changed): a negative dimension (Slice clamps its range into ``[0, dim]``: with ``dim = -1`` the
    assertion ``!(hi < lo)`` aborts the interpreter), and an int64/int32 tensor declared with billions of elements
    (data propagation allocates a value per element: 24 GB for a Slice ``steps`` declared ``[2**31]``, 16 bytes of
    data), or inferred with them (a ``Range`` to ``2**40``: data propagation is then left off). Raises what
    ``onnx.shape_inference.infer_shapes`` raises for other problems.
    """
    g = model.graph
    if any(_hazard(vi) for vi in (*g.input, *g.output, *g.value_info)) or any(_hazard_init(t) for t in g.initializer):
        model = _without_hazards(model)
    # Data propagation materializes integer tensors: a Range(0, 2**40) into a Cast is 8 TiB before any error. A
    # first run without it gives the shapes; a large integer tensor among them keeps data propagation off.
    plain = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    if any(_hazard(vi) for vi in plain.graph.value_info):
        return plain
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


def _hazard(vi: onnx.ValueInfoProto) -> bool:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return False
    dims = vi.type.tensor_type.shape.dim
    if any(d.HasField("dim_value") and d.dim_value < 0 for d in dims):
        return True
    if vi.type.tensor_type.elem_type in _SHAPE_TYPES and dims and all(d.HasField("dim_value") for d in dims):
        return int(np.prod([d.dim_value for d in dims], dtype=np.float64)) > _MAX_SHAPE_VALUES
    return False


def _hazard_init(t: onnx.TensorProto) -> bool:
    return any(d < 0 for d in t.dims) or (
        t.data_type in _SHAPE_TYPES and int(np.prod(list(t.dims), dtype=np.float64)) > _MAX_SHAPE_VALUES)


def _without_hazards(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if _hazard(vi):
            for d in vi.type.tensor_type.shape.dim:
                d.Clear()
    declared = {vi.name for vi in g.input}
    for t in [t for t in g.initializer if _hazard_init(t)]:
        # a typed input of unknown dims stands in for it
        g.initializer.remove(t)
        if t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, [None] * len(t.dims)))
    return copy
