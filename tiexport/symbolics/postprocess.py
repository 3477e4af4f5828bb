"""Turn an exporter's output (with tiexport marker nodes) into a clean QDQ model; pure ONNX, no torch.

Rewrites, in order (each marker ``M = tiexport.QuantizeDequantize(x)`` carries module name, scales, zero points, axis
and integer range):

- ``M(w)`` with ``w`` a constant -> ``DequantizeLinear(w_q)`` where ``w_q = clamp(round(w / s) + z, qmin, qmax)`` is
  an int8/uint8 initializer named ``<module>.quantized`` (weights are stored quantized, tidl.md §2 / §6 item 5);
- ``M(x)`` -> ``QuantizeLinear(x) -> DequantizeLinear`` with constant ``<module>.scale`` / ``<module>.zero_point``;
- ``M(x)`` with a range narrower than int8/uint8 (e.g. 4-bit ``[-8, 7]``) -> per tensor: ``Clip(x, lo, hi)`` first,
  with ``lo/hi = (qmin/qmax - z) * s``; per channel: ``Clip`` on the integers between Q and DQ. Either is exact.

Node names: ``<module>/QuantizeLinear``, ``<module>/DequantizeLinear``, ``<module>/Clip``; a module quantizing more
than one tensor gets ``_1``, ``_2``... on its second and later sites. Then: unused nodes and initializers are
removed, exporter metadata on nodes is dropped, the opset is converted to the requested one (the dynamo exporter
builds at 18), and the IR version is set to the lowest that the opset needs (TIDL reads IR <= 9, tidl.md §3).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tiexport.symbolics.qdq import MARKER_DOMAIN, MARKER_OP

__all__ = [
    "QdqSite",
    "expand_markers",
    "finalize",
    "fold_weight_transposes",
    "reduce_mean_to_global_pool",
    "remove_identities",
    "remove_unused",
    "reshape_without_allowzero",
    "set_opset_and_ir",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QdqSite:
    """One expanded quantization site: which module it came from and the nodes it became."""

    module: str
    quantize_node: str | None
    """``None`` for a folded weight (its QuantizeLinear ran at export time)."""
    dequantize_node: str
    clip_node: str | None
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None
    quant_min: int
    quant_max: int
    weight: bool
    output: str
    """Name of the tensor the site produces (the DequantizeLinear output)."""


@dataclass
class _Names:
    used_nodes: set[str] = field(default_factory=set)
    used_values: set[str] = field(default_factory=set)
    per_module: Counter[str] = field(default_factory=Counter)

    def node(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_nodes:
            name, k = f"{base}_{k}", k + 1
        self.used_nodes.add(name)
        return name

    def value(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_values:
            name, k = f"{base}_{k}", k + 1
        self.used_values.add(name)
        return name


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _attr(node: onnx.NodeProto, name: str) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    raise ValueError(f"marker node {node.name!r} lacks attribute {name!r}")


def _as_list(v: object) -> list[object]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _channel_shape(ndim: int, axis: int, n: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = n
    return tuple(shape)


def expand_markers(model: onnx.ModelProto) -> list[QdqSite]:
    """Replace every marker node in the main graph with standard ops, in place; return the sites in graph order."""
    graph = model.graph
    consts = _constants(graph)
    names = _Names()
    names.used_nodes.update(n.name for n in graph.node if n.name)
    names.used_values.update(init.name for init in graph.initializer)
    for n in graph.node:
        names.used_values.update(n.input)
        names.used_values.update(n.output)
    names.used_values.update(v.name for v in graph.input)
    shared_params: dict[tuple[str, str, bytes, int], str] = {}
    new_inits: list[onnx.TensorProto] = []
    sites: list[QdqSite] = []
    new_nodes: list[onnx.NodeProto] = []

    def param(module: str, suffix: str, arr: np.ndarray) -> str:
        key = (module, suffix, arr.tobytes() + str(arr.shape).encode(), int(arr.dtype.num))
        if key in shared_params:
            return shared_params[key]
        name = names.value(f"{module}.{suffix}")
        new_inits.append(numpy_helper.from_array(arr, name))
        shared_params[key] = name
        return name

    for node in graph.node:
        if not (node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP):
            new_nodes.append(node)
            continue
        raw = _attr(node, "module")
        module = (raw.decode() if isinstance(raw, bytes) else str(raw)) or "quant"
        scale = np.asarray([float(v) for v in _as_list(_attr(node, "scale"))], dtype=np.float32)  # type: ignore[arg-type]
        zps = [int(v) for v in _as_list(_attr(node, "zero_point"))]  # type: ignore[call-overload]
        axis = int(_attr(node, "axis"))  # type: ignore[call-overload]
        qmin, qmax = int(_attr(node, "quant_min")), int(_attr(node, "quant_max"))  # type: ignore[call-overload]
        signed = qmin < 0
        np_dtype = np.int8 if signed else np.uint8
        full = (qmin, qmax) == ((-128, 127) if signed else (0, 255))
        per_channel = axis >= 0
        if not per_channel:
            scale = scale.reshape(())
        zp = np.asarray(zps, dtype=np_dtype).reshape(scale.shape)
        x, y = node.input[0], node.output[0]
        names.per_module[module] += 1
        s_name = param(module, "scale", scale)
        z_name = param(module, "zero_point", zp)
        axis_kw = {"axis": axis} if per_channel else {}

        if x in consts:
            w = consts[x].astype(np.float32)
            s_b = scale.reshape(_channel_shape(w.ndim, axis, scale.size)) if per_channel else scale
            z_b = zp.astype(np.int64).reshape(s_b.shape)
            q = np.clip(np.rint(w / s_b) + z_b, qmin, qmax).astype(np_dtype)
            q_name = names.value(f"{module}.quantized")
            new_inits.append(numpy_helper.from_array(q, q_name))
            dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [y],
                                  name=names.node(f"{module}/DequantizeLinear"), **axis_kw)
            new_nodes.append(dq)
            sites.append(QdqSite(module, None, dq.name, None, tuple(float(v) for v in scale.ravel()), tuple(zps),
                                 axis if per_channel else None, qmin, qmax, True, y))
            continue

        cur = x
        clip_name = None
        if not full and not per_channel:
            lo = np.asarray((qmin - zps[0]) * scale, dtype=np.float32).reshape(())
            hi = np.asarray((qmax - zps[0]) * scale, dtype=np.float32).reshape(())
            clip_name = names.node(f"{module}/Clip")
            clipped = names.value(f"{clip_name}_output_0")
            bounds = [param(module, "clip_min", lo), param(module, "clip_max", hi)]
            new_nodes.append(helper.make_node("Clip", [cur, *bounds], [clipped], name=clip_name))
            cur = clipped
        q_node = names.node(f"{module}/QuantizeLinear")
        q_out = names.value(f"{q_node}_output_0")
        new_nodes.append(helper.make_node("QuantizeLinear", [cur, s_name, z_name], [q_out], name=q_node, **axis_kw))
        cur = q_out
        if not full and per_channel:
            clip_name = names.node(f"{module}/Clip")
            clipped = names.value(f"{clip_name}_output_0")
            new_nodes.append(helper.make_node(
                "Clip", [cur, param(module, "qmin", np.asarray(qmin, dtype=np_dtype)),
                         param(module, "qmax", np.asarray(qmax, dtype=np_dtype))], [clipped], name=clip_name))
            cur = clipped
        dq_node = names.node(f"{module}/DequantizeLinear")
        new_nodes.append(helper.make_node("DequantizeLinear", [cur, s_name, z_name], [y], name=dq_node, **axis_kw))
        sites.append(QdqSite(module, q_node, dq_node, clip_name, tuple(float(v) for v in scale.ravel()), tuple(zps),
                             axis if per_channel else None, qmin, qmax, False, y))

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    for imp in list(model.opset_import):
        if imp.domain == MARKER_DOMAIN:
            model.opset_import.remove(imp)
    leftover = [n.name for n in graph.node if n.domain == MARKER_DOMAIN]
    if leftover:
        raise RuntimeError(f"marker nodes left after expansion: {leftover[:3]}")
    return sites


def remove_unused(graph: onnx.GraphProto) -> int:
    """Drop nodes whose outputs nobody reads (ONNX standard ops are side-effect free) and unread initializers."""
    removed = 0
    outputs = {o.name for o in graph.output}
    while True:
        used = set(outputs)
        for n in graph.node:
            used.update(i for i in n.input if i)
            for a in n.attribute:  # subgraphs read outer values by name
                if a.type == onnx.AttributeProto.GRAPH:
                    used.update(_subgraph_inputs(a.g))
        dead = [n for n in graph.node if n.output and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
            removed += 1
    used = set(outputs)
    for n in graph.node:
        used.update(n.input)
    keep = [init for init in graph.initializer if init.name in used]
    removed += len(graph.initializer) - len(keep)
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    live = {init.name for init in graph.initializer} | {o for n in graph.node for o in n.output}
    live |= {i.name for i in graph.input}
    vi = [v for v in graph.value_info if v.name in live]
    if len(vi) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(vi)
    return removed


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    out: set[str] = set()
    for n in g.node:
        out.update(n.input)
    return out


def _strip_exporter_metadata(model: onnx.ModelProto) -> None:
    """Node metadata (the dynamo exporter's stack traces, module paths) needs IR 10 and leaks local paths."""
    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del v.metadata_props[:]
    for init in model.graph.initializer:
        del init.metadata_props[:]
    del model.graph.metadata_props[:]


def set_opset_and_ir(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default-domain opset to ``opset`` when it differs; set the lowest IR version that opset needs."""
    current = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 0)
    if current != opset:
        from onnx import version_converter

        model = version_converter.convert_version(model, opset)
        _drop_default_attributes_unknown_to(model, opset)
    ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.functions:
        ir = max(ir, 8)  # local functions need IR 8
    model.ir_version = ir
    return model


def _drop_default_attributes_unknown_to(model: onnx.ModelProto, opset: int) -> None:
    """ONNX's version converter keeps attributes that only newer opsets define (Resize ``antialias``, Reduce*
    ``noop_with_empty_axes``...). Where such an attribute holds its default value, dropping it is exact; any other
    value cannot be expressed in the older opset."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        for attr in list(node.attribute):
            if attr.name in schema.attributes:
                continue
            value = helper.get_attribute_value(attr)
            if value in _NEWER_DEFAULTS.get(attr.name, ()):
                node.attribute.remove(attr)
            else:
                raise ValueError(f"{node.op_type} {node.name!r}: attribute {attr.name}={value!r} has no equivalent "
                                 f"in opset {opset}; export with opset_version=18 or newer")


# Attributes added in opsets after 17, with the values that mean "the old behaviour".
_NEWER_DEFAULTS: dict[str, tuple[object, ...]] = {
    "noop_with_empty_axes": (0,),
    "antialias": (0,),
    "keep_aspect_ratio_policy": (b"stretch", "stretch"),
    "saturate": (1,),
    "stash_type": (1,),
    "block_size": (0,),
    "output_dtype": (0,),
}


def remove_identities(graph: onnx.GraphProto) -> int:
    """``Identity(x) -> x``: TIDL runs a standalone Identity on Arm (tidl.md §3); the exporters leave a few."""
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input} | {init.name for init in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
            continue
        src, dst = node.input[0], node.output[0]
        if dst in outputs:
            producer = producers.get(src)
            if src in inputs or src in outputs or producer is None:
                continue  # an output that is a graph input/initializer needs its Identity
            _rename_value(graph, src, dst)
        else:
            _rename_value(graph, dst, src, uses_only=True)
        graph.node.remove(node)
        producers = {o: n for n in graph.node for o in n.output}
        removed += 1
    return removed


def _rename_value(graph: onnx.GraphProto, old: str, new: str, uses_only: bool = False) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        if not uses_only:
            for i, name in enumerate(n.output):
                if name == old:
                    n.output[i] = new
    if not uses_only:
        for v in graph.value_info:
            if v.name == old:
                v.name = new


def fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """``Transpose(DequantizeLinear(w_q)) -> DequantizeLinear(transpose(w_q))`` for an int8 initializer ``w_q`` read
    by nothing else (the TorchScript exporter writes ``MatMul(x, Transpose(W))`` for a linear layer on 3-D input):
    TIDL takes per-column MatMul weights only from a constant initializer (tidl.md §2 InnerProduct). Exact."""
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = Counter(i for n in graph.node for i in n.input)
    producers = {o: n for n in graph.node for o in n.output}
    folded = 0
    for tr in list(graph.node):
        if tr.op_type != "Transpose" or not tr.input:
            continue
        dq = producers.get(tr.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or consumers[dq.output[0]] != 1:
            continue
        w_name = dq.input[0]
        if w_name not in inits or consumers[w_name] != 1:
            continue
        w = numpy_helper.to_array(inits[w_name])
        perm = [int(p) for p in next((helper.get_attribute_value(a) for a in tr.attribute if a.name == "perm"),
                                     list(range(w.ndim))[::-1])]
        axis_attr = next((a for a in dq.attribute if a.name == "axis"), None)
        scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        if scale is None:
            continue
        new_w = numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), w_name)
        inits[w_name].CopyFrom(new_w)
        if scale.ndim == 1 and axis_attr is not None:
            old_axis = axis_attr.i % w.ndim
            axis_attr.i = perm.index(old_axis)
        elif scale.ndim == 1:  # default axis 1 of the untransposed weight
            dq.attribute.append(helper.make_attribute("axis", perm.index(1 % w.ndim)))
        dq.output[0] = tr.output[0]
        graph.node.remove(tr)
        folded += 1
    return folded


def reduce_mean_to_global_pool(model: onnx.ModelProto) -> int:
    """``ReduceMean(x, axes=all spatial, keepdims=1) -> GlobalAveragePool(x)`` (the dynamo exporter writes
    ``adaptive_avg_pool2d(x, 1)`` as ReduceMean, which TIDL runs on Arm; GlobalAveragePool it accelerates,
    tidl.md §3). Exact."""
    graph = model.graph
    ranks = _ranks(model)
    consts = _constants(graph)
    count = 0
    for node in graph.node:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        rank = ranks.get(node.input[0])
        if rank is None or rank < 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("keepdims", 1)) != 1:
            continue
        if "axes" in attrs:
            axes = [int(v) for v in attrs["axes"]]
        elif len(node.input) > 1 and node.input[1] in consts:
            axes = [int(v) for v in consts[node.input[1]].ravel()]
        else:
            continue
        if sorted(a % rank for a in axes) != list(range(2, rank)):
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        count += 1
    return count


def reshape_without_allowzero(graph: onnx.GraphProto) -> int:
    """``Reshape(allowzero=1)`` with a constant shape free of zeros -> ``allowzero=0`` (same result; TIDL does not
    support allowzero, tidl.md §3)."""
    consts = _constants(graph)
    count = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        attr = next((a for a in node.attribute if a.name == "allowzero"), None)
        if attr is None or attr.i == 0:
            continue
        shape = consts.get(node.input[1])
        if shape is not None and not np.any(shape == 0):
            node.attribute.remove(attr)
            count += 1
    return count


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here; the checker runs it strictly later
        inferred = model
    out: dict[str, int] = {}
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = len(v.type.tensor_type.shape.dim)
    for init in g.initializer:
        out[init.name] = len(init.dims)
    return out


def finalize(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, list[QdqSite]]:
    """All the rewrites of this module, in order; returns the new model and its quantization sites."""
    sites = expand_markers(model)
    _strip_exporter_metadata(model)
    remove_identities(model.graph)
    fold_weight_transposes(model.graph)
    remove_unused(model.graph)
    model = set_opset_and_ir(model, opset)
    reduce_mean_to_global_pool(model)
    reshape_without_allowzero(model.graph)
    remove_unused(model.graph)
    log.debug("expanded %d quantization sites from %d modules", len(sites), len({s.module for s in sites}))
    return model, sites
