"""Outputs identical by construction: two models that compute the same function of the same inputs.

``fix`` uses it when no rewrite touched a node or a weight (only shape annotations were added): comparing nodes,
initializers, inputs, outputs and opsets proves the outputs bit-identical, which running samples only suggests, and
costs a fraction of running both models (bench/RESULTS.md, fix section).
"""

from __future__ import annotations

import onnx

__all__ = ["same_computation"]


def same_computation(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """True when ``a`` and ``b`` compute the same function of the same inputs: same opsets, graph input names and
    element types, output names in order, initializers (name, type, dims, bytes) and nodes (as a multiset, so a
    topological re-sort counts as the same). Shape annotations (``value_info``, pinned input dims) are ignored:
    they do not enter the computation. Model-local functions must be identical. False on anything it does not
    compare exactly (sparse initializers)."""
    ga, gb = a.graph, b.graph
    if {(o.domain, o.version) for o in a.opset_import} != {(o.domain, o.version) for o in b.opset_import}:
        return False
    if [(i.name, i.type.tensor_type.elem_type) for i in ga.input] != \
            [(i.name, i.type.tensor_type.elem_type) for i in gb.input]:
        return False
    if [o.name for o in ga.output] != [o.name for o in gb.output]:
        return False
    if ga.sparse_initializer or gb.sparse_initializer:
        return False
    if sorted(t.name for t in ga.initializer) != sorted(t.name for t in gb.initializer):
        return False  # also catches a name given twice on one side
    if [f.SerializeToString(deterministic=True) for f in a.functions] != \
            [f.SerializeToString(deterministic=True) for f in b.functions]:
        return False  # model-local functions are part of the computation
    if sorted(node_key(n) for n in ga.node) != sorted(node_key(n) for n in gb.node):
        return False
    tensors = {t.name: t for t in ga.initializer}
    for t in gb.initializer:
        other = tensors.get(t.name)
        if other is None or other.data_type != t.data_type or list(other.dims) != list(t.dims):
            return False
        try:
            if tensor_bytes(other) != tensor_bytes(t):
                return False
        except Exception:  # a tensor numpy_helper cannot decode: not provably the same
            return False
    return True


def node_key(node: onnx.NodeProto) -> bytes:
    """A node's computation as bytes: op, domain, inputs, outputs and attributes in name order (name and doc
    string left out)."""
    key = onnx.NodeProto(op_type=node.op_type, domain=node.domain, input=node.input, output=node.output)
    key.attribute.extend(sorted(node.attribute, key=lambda attr: attr.name))
    return key.SerializeToString(deterministic=True)


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """A tensor's data as bytes; for one stored outside the model, where it is stored (two tensors that point at
    the same bytes of the same file are the same; fix keeps the input's weights so until it writes them)."""
    from onnx import numpy_helper

    if t.data_location == onnx.TensorProto.EXTERNAL and any(e.key == "location" and e.value for e in t.external_data):
        return b"external:" + "|".join(f"{e.key}={e.value}" for e in t.external_data).encode()
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
