"""``tiexport::quantize_dequantize``: its TorchScript symbolic and its dynamo translation, side by side.

Both emit the same single marker node, ``tiexport.QuantizeDequantize`` (attributes: ``module``, ``scale``,
``zero_point``, ``axis``, ``quant_min``, ``quant_max``), and nothing else. Keeping the exporters' part this small is
deliberate: the two exporters differ in naming, constant folding and optimization, and a marker node passes through
both untouched (no exporter folds or renames an op it does not know). The export pass pipeline
(:class:`tiexport.passes.expand_markers.ExpandQdqMarkersPass` first) then expands every marker into the standard
``[Clip ->] QuantizeLinear -> DequantizeLinear`` with constant scale and zero point, names the nodes after
``module``, and folds weight quantization into int8 initializers, identically for both exporters. The marker domain
never reaches the saved file.
"""

from __future__ import annotations

from typing import Any

from onnx.defs import OpSchema

from tiexport import compat
from tiexport.passes.expand_markers import MARKER_DOMAIN, MARKER_OP
from tiexport.symbolics.names import OP_NAME, OP_NAMESPACE
from tiexport.symbolics.registry import REGISTRY, ExportOp

__all__ = [
    "MARKER_DOMAIN",
    "MARKER_OP",
    "MARKER_SCHEMA",
    "OP_NAME",
    "OP_NAMESPACE",
    "dynamo_quantize_dequantize",
    "ts_quantize_dequantize",
]


MARKER_SCHEMA = OpSchema(
    MARKER_OP, MARKER_DOMAIN, 1,
    "tiexport's export-time placeholder for one quantization site; replaced by QuantizeLinear/DequantizeLinear "
    "before the model is saved.",
    inputs=[OpSchema.FormalParameter("x", "T")],
    outputs=[OpSchema.FormalParameter("y", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                       "float tensors")],
    attributes=[
        OpSchema.Attribute("module", OpSchema.AttrType.STRING, "qualified name of the module of this site"),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOATS, "one scale, or one per channel"),
        OpSchema.Attribute("zero_point", OpSchema.AttrType.INTS, "one zero point, or one per channel"),
        OpSchema.Attribute("axis", OpSchema.AttrType.INT, "channel axis; -1 for per-tensor"),
        OpSchema.Attribute("quant_min", OpSchema.AttrType.INT, "lowest integer value"),
        OpSchema.Attribute("quant_max", OpSchema.AttrType.INT, "highest integer value"),
    ],
)


def ts_quantize_dequantize(g: Any, x: Any, scale: Any, zero_point: Any, axis: Any, quant_min: Any, quant_max: Any,
                           name: Any) -> Any:
    """TorchScript symbolic: one marker node; output typed like the input so shape inference continues."""
    out = g.op(
        f"{MARKER_DOMAIN}::{MARKER_OP}", x,
        module_s=compat.ts_parse_arg(name, "s"),
        scale_f=[float(v) for v in compat.ts_parse_arg(scale, "fs")],
        zero_point_i=[int(v) for v in compat.ts_parse_arg(zero_point, "is")],
        axis_i=compat.ts_parse_arg(axis, "i"),
        quant_min_i=compat.ts_parse_arg(quant_min, "i"),
        quant_max_i=compat.ts_parse_arg(quant_max, "i"),
    )
    out.setType(x.type())
    return out


def dynamo_quantize_dequantize(x: Any, scale: Any, zero_point: Any, axis: int, quant_min: int, quant_max: int,
                               name: str) -> Any:
    """Dynamo (onnxscript) translation: the same marker node; the exporter types the output from the FX graph."""
    from onnxscript.values import Opset

    marker = getattr(Opset(MARKER_DOMAIN, 1), MARKER_OP)
    return marker(x, module=str(name), scale=[float(v) for v in scale], zero_point=[int(v) for v in zero_point],
                  axis=int(axis), quant_min=int(quant_min), quant_max=int(quant_max))


def _overload() -> Any:
    import torch

    import tiexport.symbolics.ops  # noqa: F401  (defines the op)

    return getattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME).default


QUANTIZE_DEQUANTIZE = REGISTRY.add(ExportOp(
    name=f"{OP_NAMESPACE}::{OP_NAME}",
    overload=_overload,
    torchscript=ts_quantize_dequantize,
    dynamo=dynamo_quantize_dequantize,
    schemas=(MARKER_SCHEMA,),
))
