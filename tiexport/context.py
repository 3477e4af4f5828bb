"""ModelContext: one read-only, indexed view of an ONNX model, shared by the validator rules, parity, the snippet
generator and ``tiexport info``.

It is built once per model (not per device): producer/consumer maps, constants, Q/DQ parameters and inferred shapes.
Large initializers are never decoded: shape inference runs on a *skeleton* of the model in which every initializer
above a few elements is replaced by a graph input of the same type and shape, so inference costs the same for a
100 MB model as for a 1 MB one, and weights stored as external data are never read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from tiexport.errors import first_line
from tiexport.onnx_io import LoadedModel, tensor_to_array
from tiexport.shapes import SkeletonConstant, infer_shapes, skeleton
from tiexport.tidl_spec import QDQ_OPS

__all__ = ["ModelContext", "QParams", "dag_problem", "dtype_name"]

log = logging.getLogger(__name__)


_INT_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
}


def dtype_name(elem_type: int) -> str:
    """'int8', 'uint8', 'float' ... for an ONNX TensorProto element type."""
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type{elem_type}"


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one QuantizeLinear or DequantizeLinear node."""

    scale: np.ndarray
    zero_point: np.ndarray | None
    qtype: int
    """Element type of the integer side (the zero point's type, else ``output_dtype``, else uint8)."""
    axis: int
    block_size: int = 0

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0 and self.scale.size > 1

    @property
    def zero_points(self) -> np.ndarray:
        if self.zero_point is None:
            return np.zeros(self.scale.shape, dtype=np.int64)
        return self.zero_point.astype(np.int64)

    @property
    def symmetric(self) -> bool:
        """Zero point 0 everywhere (int8 or uint8). uint8 zero point 128 is a symmetric grid, not TIDL's sense."""
        return bool(np.all(self.zero_points == 0))

    @property
    def uint8_midpoint(self) -> bool:
        """uint8 with zero point 128: the same grid as int8 with zero point 0."""
        return self.qtype == TensorProto.UINT8 and bool(np.all(self.zero_points == 128))

    @property
    def signed(self) -> bool:
        return self.qtype in (TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT4)

    @property
    def qrange(self) -> tuple[int, int] | None:
        return _INT_RANGES.get(self.qtype)

    def same_as(self, other: QParams) -> bool:
        return (
            self.qtype == other.qtype
            and self.scale.shape == other.scale.shape
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_points, other.zero_points)
            and (not self.per_channel or self.axis == other.axis)
        )


# packed types (older onnx releases lack some of them)
_SUB_BYTE_BITS = {getattr(TensorProto, n): bits for n, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4),
                                                                  ("INT2", 2), ("UINT2", 2)) if hasattr(TensorProto, n)}


def _data_size_error(t: onnx.TensorProto) -> str:
    """What the checker says about an initializer whose stored bytes do not fit its shape, read from the sizes alone
    (raw data, or the external-data length); "" when they fit or cannot be told without reading."""
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return ""
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # a type numpy cannot hold: the checker on the skeleton judges it
        return ""
    n = 1
    for d in t.dims:
        n *= int(d)
    bits = _SUB_BYTE_BITS.get(t.data_type, 8 * itemsize)
    need = (n * bits + 7) // 8
    if t.data_location == TensorProto.EXTERNAL:
        length = next((int(e.value) for e in t.external_data if e.key == "length" and e.value.isdigit()), None)
        have = length
    elif t.HasField("raw_data"):
        have = len(t.raw_data)
    else:
        return ""  # typed fields: small tensors stay in the skeleton, where the checker counts them
    if have is None or have == need:
        return ""
    return (f"initializer {t.name!r} holds {have} bytes of data, its shape {list(t.dims)} of "
            f"{dtype_name(t.data_type)} needs {need}")


class ModelContext:
    """Indexed, read-only view of a model for rules. Never mutates the model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: onnx.ModelProto = loaded.model
        self.graph: onnx.GraphProto = loaded.model.graph
        self.name = loaded.name
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer.setdefault(out, i)
                    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                        self.constant_nodes[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
            for inp in sorted(outer_references(node) - set(node.input)):
                # an If/Loop/Scan body reading an outer tensor: the node consumes it (a DQ used only inside the
                # branches is not dead)
                self.consumers.setdefault(inp, []).append(i)
        self.graph_inputs: list[onnx.ValueInfoProto] = [
            vi for vi in self.graph.input if vi.name not in self.initializers
        ]
        self.graph_output_names: set[str] = {o.name for o in self.graph.output}
        self._const_cache: dict[str, np.ndarray | None] = {}
        # Rules ask for the same Q/DQ parameters and shapes once per rule and per device (validate of ResNet-50 for
        # all six devices: ~7000 qparams() and ~4400 shape() calls for ~650 nodes, a quarter of its time; see
        # bench/RESULTS.md). Both are pure functions of the unchanging model, so they are computed once. The node
        # itself is kept in the entry so that an id() reused by another object can never hit.
        self._qparams_cache: dict[int, tuple[onnx.NodeProto, QParams | None]] = {}
        self._shape_cache: dict[str, tuple[int | str | None, ...] | None] = {}
        self.cache: dict[str, Any] = {}
        """Per-model results that rule modules compute once for all devices (keyed by module); never global."""

    # ------------------------------------------------------------------------------------------------ basics
    @cached_property
    def opset(self) -> int:
        """The ai.onnx opset version (0 when the model imports none)."""
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 0

    @cached_property
    def is_quantized(self) -> bool:
        return any(n.op_type in QDQ_OPS for n in self.nodes)

    @cached_property
    def qat_v1_clips(self) -> tuple[onnx.NodeProto, ...]:
        """The Clip nodes of a TIDL QAT v1 model, or () when the model is not one.

        TI's legacy QAT (torchmodelopt v1) exports a float graph with no Q/DQ whose activation ranges are Clip nodes
        at powers of two (PACT2: ``[0, 2**k]`` after a ReLU, ``[-2**k, 2**k]`` otherwise) after (nearly) every
        layer. Recognized when there are no Q/DQ nodes, at least two such Clips, and at least one for every two
        Conv/Gemm/MatMul layers: a float model's ReLU6 (Clip 0..6) or one Clip(0, 1) does not qualify.
        """
        if self.is_quantized:
            return ()
        clips = []
        for node in self.nodes_of("Clip"):
            lo = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if self.opset < 11:  # min/max were attributes before opset 11
                lo_a, hi_a = self.attr(node, "min"), self.attr(node, "max")
                lo = None if lo_a is None else np.asarray(lo_a, np.float32)
                hi = None if hi_a is None else np.asarray(hi_a, np.float32)
            if lo is None or hi is None or lo.size != 1 or hi.size != 1:
                continue
            lo_v, hi_v = float(np.asarray(lo).ravel()[0]), float(np.asarray(hi).ravel()[0])
            mant, _ = np.frexp(hi_v)
            if hi_v > 0 and mant == 0.5 and lo_v in (0.0, -hi_v):
                clips.append(node)
        layers = sum(1 for n in self.nodes if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"))
        return tuple(clips) if len(clips) >= 2 and 2 * len(clips) >= layers else ()

    def node_name(self, node: onnx.NodeProto) -> str:
        """The node's name, or a stable stand-in for unnamed nodes (its first output)."""
        if node.name:
            return node.name
        first = next((o for o in node.output if o), "")
        return f"<{node.op_type} -> {first}>"

    def attr(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def int_attr(self, node: onnx.NodeProto, name: str, default: int) -> int:
        """An INT attribute, or ``default`` when absent or of another type (the checker reports the latter)."""
        for a in node.attribute:
            if a.name == name:
                return int(a.i) if a.type == onnx.AttributeProto.INT else default
        return default

    def producer_of(self, tensor: str) -> onnx.NodeProto | None:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def consumers_of(self, tensor: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(tensor, [])]

    def nodes_of(self, *op_types: str) -> Iterator[onnx.NodeProto]:
        wanted = set(op_types)
        return (n for n in self.nodes if n.op_type in wanted)

    # ------------------------------------------------------------------------------------------------ constants
    def is_const(self, tensor: str) -> bool:
        """True for initializers (not overridable graph inputs) and Constant-node outputs."""
        return tensor in self.initializers or tensor in self.constant_nodes

    def const(self, tensor: str) -> np.ndarray | None:
        """The value of a constant tensor (decoded on first use), or None if it is not constant or not decodable."""
        if tensor in self._const_cache:
            return self._const_cache[tensor]
        value: np.ndarray | None = None
        try:
            if tensor in self.initializers:
                value = tensor_to_array(self.initializers[tensor], self.loaded.base_dir)
            elif tensor in self.constant_nodes:
                node = self.constant_nodes[tensor]
                attr = node.attribute[0] if node.attribute else None
                if attr is not None:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        value = tensor_to_array(attr.t, self.loaded.base_dir)
                    else:
                        value = np.asarray(helper.get_attribute_value(attr))
        except Exception as exc:  # an undecodable tensor is reported by rules, not raised here
            log.debug("cannot decode constant %s: %s", tensor, exc)
            value = None
        self._const_cache[tensor] = value
        return value

    def const_shape(self, tensor: str) -> tuple[int, ...] | None:
        """Shape of a constant without decoding it (initializers), else from its value."""
        if tensor in self.initializers:
            return tuple(int(d) for d in self.initializers[tensor].dims)
        v = self.const(tensor)
        return None if v is None else tuple(v.shape)

    def const_elem_type(self, tensor: str) -> int | None:
        if tensor in self.initializers:
            return int(self.initializers[tensor].data_type)
        node = self.constant_nodes.get(tensor)
        if node is not None and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            return int(node.attribute[0].t.data_type)
        return None

    # ------------------------------------------------------------------------------------------------ Q/DQ
    def qdq_nodes(self) -> Iterator[onnx.NodeProto]:
        """Every QuantizeLinear and DequantizeLinear node, in graph order."""
        return self.nodes_of(*QDQ_OPS)

    def quantizers(self) -> Iterator[tuple[onnx.NodeProto, QParams]]:
        """Every Q/DQ node whose scale and zero point are decodable constants, with its parameters, in graph order
        (nodes with other parameters are rule TIDL011's)."""
        for node in self.qdq_nodes():
            qp = self.qparams(node)
            if qp is not None:
                yield node, qp

    def input_quantizers(self, tensor: str, through: frozenset[str], depth: int = 0) -> Iterator[onnx.NodeProto]:
        """The QuantizeLinear nodes reading ``tensor``, directly or behind up to 4 ops of ``through`` (Cast,
        Reshape...): how a network input is quantized."""
        for c in self.consumers_of(tensor):
            if c.op_type == "QuantizeLinear":
                yield c
            elif c.op_type in through and depth < 4 and c.output:
                yield from self.input_quantizers(c.output[0], through, depth + 1)

    def qparams(self, node: onnx.NodeProto) -> QParams | None:
        """Q/DQ parameters, or None when scale or zero point is not a decodable constant."""
        hit = self._qparams_cache.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        value = self._qparams(node)
        self._qparams_cache[id(node)] = (node, value)
        return value

    def _qparams(self, node: onnx.NodeProto) -> QParams | None:
        if node.op_type not in QDQ_OPS or len(node.input) < 2:
            return None
        scale = self.const(node.input[1])
        if scale is None:
            return None
        zp = None
        qtype: int = TensorProto.UINT8
        if len(node.input) > 2 and node.input[2]:
            zp = self.const(node.input[2])
            zp_type = self.const_elem_type(node.input[2])
            if zp is None or zp_type is None:
                return None
            qtype = zp_type
        else:
            out_dtype = self.int_attr(node, "output_dtype", 0)
            if node.op_type == "QuantizeLinear" and out_dtype:
                qtype = int(out_dtype)
            elif node.op_type == "DequantizeLinear":
                src = self.elem_type(node.input[0])
                if src is not None:
                    qtype = src
        return QParams(
            scale=np.asarray(scale),
            zero_point=None if zp is None else np.asarray(zp),
            qtype=qtype,
            axis=self.int_attr(node, "axis", 1),
            block_size=self.int_attr(node, "block_size", 0),
        )

    def dq_of(self, tensor: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing ``tensor``, if any."""
        node = self.producer_of(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def is_weight_dq(self, node: onnx.NodeProto) -> bool:
        """A DequantizeLinear whose data input is constant (directly or through a QuantizeLinear of a constant)."""
        if node.op_type != "DequantizeLinear" or not node.input:
            return False
        src = node.input[0]
        if self.is_const(src):
            return True
        q = self.producer_of(src)
        return q is not None and q.op_type == "QuantizeLinear" and bool(q.input) and self.is_const(q.input[0])

    # ------------------------------------------------------------------------------------------------ shapes
    @cached_property
    def _inferred(self) -> tuple[dict[str, onnx.TypeProto], str | None]:
        types: dict[str, onnx.TypeProto] = {}
        error: str | None = None
        try:
            skeleton = self.skeleton
        except (UnicodeDecodeError, ValueError, TypeError) as exc:  # invalid UTF-8 names (TIDL002 reports them)
            return {}, f"the model cannot be re-serialized for shape inference ({type(exc).__name__})"
        try:
            inferred = infer_shapes(skeleton)
            g = inferred.graph
        except Exception as exc:  # inference errors are findings (static_shape), not crashes
            error = first_line(exc)
            g = skeleton.graph
        try:
            for vi in (*g.input, *g.value_info, *g.output):
                if vi.type.HasField("tensor_type"):
                    types.setdefault(vi.name, vi.type)
            for name, t in self.initializers.items():
                types[name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        except (UnicodeDecodeError, ValueError) as exc:  # names that are not valid UTF-8 survive parsing only
            types, error = {}, f"tensor names are not valid UTF-8 ({exc.__class__.__name__})"
        return types, error

    @cached_property
    def checker_error(self) -> str | None:
        """The ONNX checker's complaint about the model (skeleton: weights not re-serialized), or None."""
        try:
            onnx.checker.check_model(self.skeleton, full_check=False)  # the skeleton may fail to build: same message
        except Exception as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
        # The skeleton leaves large initializers out, so the checker cannot see that their data is short
        for t in self.graph.initializer:
            why = _data_size_error(t)
            if why:
                return why
        return None

    @cached_property
    def skeleton(self) -> onnx.ModelProto:
        """The model with large initializers replaced by typed graph inputs (cheap to serialize and infer)."""
        g = self.graph
        constants = (SkeletonConstant(t.name, t.data_type, tuple(int(d) for d in t.dims),
                                      None if t.data_location == TensorProto.EXTERNAL else t)
                     for t in g.initializer)
        return skeleton(name="skeleton", nodes=g.node, inputs=g.input, outputs=g.output, value_info=g.value_info,
                        constants=constants, ir_version=self.model.ir_version, opset_import=self.model.opset_import,
                        functions=self.model.functions)

    @property
    def shape_inference_error(self) -> str | None:
        return self._inferred[1]

    @property
    def inferred_types(self) -> Mapping[str, onnx.TypeProto]:
        """Every tensor's type as shape inference gives it (initializers: their declared type)."""
        return self._inferred[0]

    def type_of(self, tensor: str) -> onnx.TypeProto | None:
        return self._inferred[0].get(tensor)

    def elem_type(self, tensor: str) -> int | None:
        t = self.type_of(tensor)
        if t is None or not t.HasField("tensor_type"):
            return None
        return int(t.tensor_type.elem_type) or None

    def shape(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """Dims of a tensor: int when known, the symbol (str) when symbolic, None when unknown; None if rank unknown."""
        if tensor in self._shape_cache:
            return self._shape_cache[tensor]
        value = self._shape(tensor)
        self._shape_cache[tensor] = value
        return value

    def _shape(self, tensor: str) -> tuple[int | str | None, ...] | None:
        t = self.type_of(tensor)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims: list[int | str | None] = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return tuple(dims)

    def static_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The shape when every dim is a known positive int (or 0-d), else None."""
        s = self.shape(tensor)
        if s is None or any(not isinstance(d, int) or d <= 0 for d in s):
            return None
        return tuple(int(d) for d in s)  # type: ignore[arg-type]

    def rank(self, tensor: str) -> int | None:
        s = self.shape(tensor)
        if s is not None:
            return len(s)
        cs = self.const_shape(tensor) if self.is_const(tensor) else None
        return None if cs is None else len(cs)


def _graph_attrs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", g


def outer_references(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` (If branches, Loop/Scan bodies, nested ones too) read from enclosing scopes."""
    refs: set[str] = set()
    for _, g in _graph_attrs(node):
        refs |= _free_names(g)
    return refs


def _free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for n in graph.node:
        defined.update(o for o in n.output if o)
        used.update(i for i in n.input if i)
        used |= outer_references(n)
    used.update(o.name for o in graph.output)
    return used - defined


def subgraph_contexts(ctx: ModelContext) -> list[ModelContext]:
    """A context per subgraph (If branches, Loop/Scan bodies, nested), for the rules that check Q/DQ parameters
    there too (TIDL011): the body with the outer-scope initializers it reads, node names prefixed with where the body
    sits (``<If node>/then_branch/<node>``). Built on demand; bodies are small, weights are not copied unless read."""
    out: list[ModelContext] = []

    def visit(node: onnx.NodeProto, outer: dict[str, onnx.TensorProto], prefix: str) -> None:
        for attr_name, g in _graph_attrs(node):
            body = onnx.GraphProto()
            body.CopyFrom(g)
            label = f"{prefix}{node.name or node.op_type}/{attr_name}/"
            for n in body.node:
                n.name = label + (n.name or n.op_type)
            present = {t.name for t in body.initializer}
            body.initializer.extend(outer[name] for name in sorted(_free_names(g)) if name in outer
                                    and name not in present)
            model = onnx.ModelProto(ir_version=ctx.model.ir_version, graph=body)
            model.opset_import.extend(ctx.model.opset_import)
            sub = ModelContext(LoadedModel(model, ctx.name, ctx.loaded.base_dir))
            out.append(sub)
            scope = {**outer, **{t.name: t for t in g.initializer}}
            for inner in g.node:
                visit(inner, scope, label)

    for node in ctx.nodes:
        visit(node, ctx.initializers, "")
    return out


def dag_problem(model: onnx.ModelProto) -> str:
    """Why the top-level graph cannot be rewritten safely ("" when it can): a name that is not UTF-8, two
    initializers of one name, a tensor with two producers, or a cycle. onnx-graphsurgeon fails on the first, keeps
    the first initializer where ONNX Runtime reads the last on the second, silently keeps one of the two producers on
    the third (a Conv could end up reading the wrong tensor as its weight) and cannot sort the fourth."""
    g = model.graph
    names: list[str | bytes] = [vi.name for vi in (*g.input, *g.output)] + [t.name for t in g.initializer]
    for n in g.node:
        names.extend((n.name, *n.input, *n.output))
    if any(isinstance(x, bytes) for x in names):  # protobuf hands out invalid UTF-8 strings as bytes
        return "a node or tensor name is not valid UTF-8"
    seen: set[str] = set()
    for t in g.initializer:  # ONNX Runtime reads the last of two same-named initializers, onnx-graphsurgeon the first
        if t.name in seen:
            return f"initializer {t.name!r} is defined twice"
        seen.add(t.name)
    producer: dict[str, int] = dict.fromkeys([vi.name for vi in g.input] + [t.name for t in g.initializer], -1)
    for i, n in enumerate(g.node):
        for out in n.output:
            if out and out in producer:
                return f"tensor {out!r} has two producers"
            if out:
                producer[out] = i
    deps = [{producer[t] for t in n.input if producer.get(t, -1) >= 0} for n in g.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for k in users.get(i, []):
            waiting[k] -= 1
            if waiting[k] == 0:
                ready.append(k)
    if done < len(g.node):
        return f"the graph has a cycle ({len(g.node) - done} node(s) on or after it)"
    return ""
