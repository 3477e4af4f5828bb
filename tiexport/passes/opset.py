"""ConvertOpsetPass: the default-domain opset converted to the one asked for.

The dynamo exporter builds at opset 18 or newer; TIDL reads up to 19 and TI's own exports use 17 (tidl.md §3), so
an export at 17 is converted down with ONNX's version converter. Part of the export pipeline.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import helper, version_converter

from tiexport.passes.base import Pass, PassResult

__all__ = ["ConvertOpsetPass"]

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


class ConvertOpsetPass(Pass):
    """Convert the graph to ai.onnx opset ``opset`` (exact: ONNX's version converter keeps the semantics).

    Rewrites::

        opset 18: ReduceMean(x, axes, keepdims=1, noop_with_empty_axes=0) -> opset 17: ReduceMean(x, axes, keepdims=1)

    ONNX's converter keeps attributes only newer opsets define (Resize ``antialias``, Reduce*
    ``noop_with_empty_axes``...); where such an attribute holds its default value it is dropped (exact); any other
    value cannot be expressed in the older opset and raises ValueError, which names the node. The converted graph
    replaces this one's contents in place.
    """

    def __init__(self, opset: int) -> None:
        self.opset = int(opset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(opset={self.opset})"

    def run(self, graph: gs.Graph) -> PassResult:
        if int(graph.opset) == self.opset:
            return PassResult(graph, modified=False)
        model = gs.export_onnx(graph, do_type_check=False)
        converted = version_converter.convert_version(model, self.opset)
        _drop_default_attributes_unknown_to(converted, self.opset)
        new = gs.import_onnx(converted)
        for attr in ("nodes", "inputs", "outputs", "opset", "import_domains", "functions", "ir_version"):
            setattr(graph, attr, getattr(new, attr))
        return PassResult(graph, modified=True, changes=1, numerics_changed=False)


def _drop_default_attributes_unknown_to(model: onnx.ModelProto, opset: int) -> None:
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
