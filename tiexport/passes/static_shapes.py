"""PinInputShapesPass and InferShapesPass: static input shapes, then a shape on every tensor.

TIDL needs every input dimension > 0 and every tensor's shape resolvable by ONNX shape inference (tidl.md §2 "Static
shapes are required"; §6 item 1, "All the Input Tensor Dimensions has to be greater then Zero"). Validator rules
TIDL004 and TIDL005.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from tiexport.errors import UsageError, first_line
from tiexport.passes.base import Pass, PassResult
from tiexport.shapes import SkeletonConstant, infer_shapes, skeleton

__all__ = ["InferShapesPass", "PinInputShapesPass", "inferred_ranks", "parse_input_shape"]

log = logging.getLogger(__name__)

def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``"input:1x3x224x224"`` -> ``("input", [1, 3, 224, 224])``; the name may itself contain ``:``."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise UsageError(f"--input-shape {text!r}: expected NAME:DIMS, e.g. input:1x3x224x224")
    try:
        shape = [int(d) for d in dims.lower().replace(",", "x").split("x")]
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: dimensions must be integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: every dimension must be > 0")
    return name, shape


def _is_static(shape: Sequence[object] | None) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)


class PinInputShapesPass(Pass):
    """Give graph inputs static shapes: the ones given, and a dynamic batch dimension alone pinned to 1.

    Rewrites::

        input[N, 3, 224, 224]  -> input[1, 3, 224, 224]         only dim 0 dynamic (``pin_batch``)
        input[N, 3, H, W]      -> input[1, 3, 224, 224]         ``shapes={"input": [1, 3, 224, 224]}``

    A given shape must name an existing input and match its rank and its fixed dimensions (UsageError otherwise).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]] | None = None, *, pin_batch: bool = True) -> None:
        self.shapes = {k: [int(d) for d in v] for k, v in (shapes or {}).items()}
        self.pin_batch = pin_batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shapes={self.shapes}, pin_batch={self.pin_batch})"

    def run(self, graph: gs.Graph) -> PassResult:
        inputs = {t.name: t for t in graph.inputs if isinstance(t, gs.Variable)}
        for name, shape in self.shapes.items():
            t = inputs.get(name)
            if t is None:
                raise UsageError(f"--input-shape: the model has no input named {name!r} "
                                 f"(inputs: {', '.join(inputs) or 'none'})")
            if any(d <= 0 for d in shape):
                raise UsageError(f"--input-shape {name}: every dimension must be > 0, got {shape}")
            if t.shape is not None:
                if len(t.shape) != len(shape):
                    raise UsageError(f"--input-shape {name}: rank {len(shape)} given, the input has rank "
                                     f"{len(t.shape)} ({_show(t.shape)})")
                for i, (old, new) in enumerate(zip(t.shape, shape, strict=True)):
                    if isinstance(old, (int, np.integer)) and old > 0 and old != new:
                        raise UsageError(f"--input-shape {name}: dimension {i} is fixed to {old} in the model, "
                                         f"not {new}")
        changes = 0
        for name, t in inputs.items():
            new_shape: list[int] | None = None
            if name in self.shapes:
                new_shape = self.shapes[name]
            elif self.pin_batch and t.shape is not None and len(t.shape) > 1 and not _is_static(t.shape[:1]) \
                    and _is_static(t.shape[1:]):
                new_shape = [1, *(int(d) for d in t.shape[1:])]
            if new_shape is not None and list(t.shape or []) != new_shape:
                t.shape = new_shape
                changes += 1
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)


def _show(shape: Sequence[object]) -> str:
    return "x".join(str(d) if d is not None else "?" for d in shape)


class InferShapesPass(Pass):
    """Run ONNX shape inference and write the inferred type and shape onto every intermediate and output tensor.

    Rewrites::

        conv_out: (no shape) or [N, 8, 16, 16]  -> conv_out: [1, 8, 16, 16]       after the inputs were pinned

    Shapes the inference cannot determine are left as they were. Inference runs on a skeleton of the model (large
    initializers replaced by typed inputs), so it costs the same for large and small weights. If inference fails,
    nothing changes and the error is a note.
    """

    def run(self, graph: gs.Graph) -> PassResult:
        try:
            skeleton = _skeleton(graph)
        except Exception as exc:  # a graph gs cannot export is reported, not fixed here
            return PassResult(graph, modified=False, notes=[f"cannot export the graph for shape inference: {exc}"])
        try:
            inferred = infer_shapes(skeleton)
        except Exception as exc:
            return PassResult(graph, modified=False, notes=[f"shape inference failed: {first_line(exc)}"])
        known: dict[str, onnx.ValueInfoProto] = {vi.name: vi for vi in (*inferred.graph.value_info,
                                                                        *inferred.graph.output)}
        input_names = {t.name for t in graph.inputs}
        changes = 0
        for name, t in graph.tensors().items():
            if not isinstance(t, gs.Variable) or name in input_names or name not in known:
                continue
            tt = known[name].type.tensor_type if known[name].type.HasField("tensor_type") else None
            if tt is None:
                continue
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
            shape: list[int | str | None] | None = None
            if tt.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            changed = False
            if dtype is not None and (t.dtype is None or np.dtype(t.dtype) != np.dtype(dtype)):
                t.dtype = dtype
                changed = True
            if shape is not None and (t.shape is None or list(t.shape) != shape) and _better(shape, t.shape):
                t.shape = shape
                changed = True
            changes += changed
        return PassResult(graph, modified=changes > 0, changes=changes, numerics_changed=False)


def _better(new: list[int | str | None], old: Sequence[object] | None) -> bool:
    """Take the inferred shape unless it knows less than the declared one (fewer fixed dimensions)."""
    if old is None or len(old) != len(new):
        return True
    fixed_new = sum(isinstance(d, int) and d > 0 for d in new)
    fixed_old = sum(isinstance(d, (int, np.integer)) and d > 0 for d in old)
    return bool(fixed_new >= fixed_old)


def _skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto without its large constants (typed inputs instead) and without stale shapes."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    # outputs without shapes: the inferred ones come back instead of the declared (possibly stale) ones
    outputs = []
    for out in graph.outputs:
        vi = onnx.ValueInfoProto(name=out.name)
        if out.dtype is not None:
            vi.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(out.dtype))
        outputs.append(vi)
    declared = {t.name for t in graph.inputs}
    constants = (SkeletonConstant(name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)),
                                  tuple(int(d) for d in t.shape), partial(OnnxExporter.export_tensor_proto, t))
                 for name, t in graph.tensors().items() if isinstance(t, gs.Constant) and name not in declared)
    return skeleton(name=graph.name or "graph", nodes=[OnnxExporter.export_node(n) for n in graph.nodes],
                    inputs=[OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs],
                    outputs=outputs, constants=constants, ir_version=graph.ir_version or onnx.IR_VERSION,
                    opset_import=_opsets(graph))


def _opsets(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    from onnx_graphsurgeon.exporters.onnx_exporter import update_import_domains

    return [onnx.helper.make_opsetid(o.domain, o.version) for o in update_import_domains(graph)]


def inferred_static_shapes(graph: gs.Graph) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape inference (on the skeleton) gives all dimensions as numbers; {} when it fails."""
    try:
        inferred = infer_shapes(_skeleton(graph))
    except Exception:  # best effort, as inferred_ranks
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                out[vi.name] = tuple(int(d.dim_value) for d in dims)
    return out


def inferred_ranks(graph: gs.Graph) -> dict[str, int]:
    """The rank of every tensor whose rank is known, declared or inferred (ONNX shape inference on the skeleton;
    declared shapes alone when inference fails). Reads the graph, changes nothing."""
    ranks = {name: len(t.shape) for name, t in graph.tensors().items() if t.shape is not None}
    try:
        inferred = infer_shapes(_skeleton(graph))
    except Exception:  # best effort: the passes that need a rank skip a node whose rank is unknown
        return ranks
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks.setdefault(vi.name, len(vi.type.tensor_type.shape.dim))
    return ranks
