"""The facts of one TIDL SDK release that rules and passes share: :class:`TidlSpec`, by version.

Every fact names its source. The sources today are the project's TIDL notes (``shared/reference/tidl.md``, a map
to TI's documents: ``edgeai-tidl-tools`` ``docs/supported_ops_rts_versions.md``, ``tidl_fsg_quantization.md``,
``osrt_python/README.md``; ``edgeai-benchmark`` ``core/runtime_options.py``), section by section; facts that note
marks unverified are marked so here too. One release is described so far (the 11.0 operator table: it has
DeformConv, InstanceNormalization, SpaceToDepth, Unsqueeze, Neg and the trigonometric ops that 11.0 added, tidl.md
§8); another release is another :class:`TidlSpec` in :data:`_SPECS`, and ``get_spec(version)`` picks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiexport.errors import UsageError

__all__ = ["DEFAULT_SDK", "SDK_VERSIONS", "TidlSpec", "get_spec"]


@dataclass(frozen=True)
class TidlSpec:
    """What one TIDL SDK release's prequantized import takes (device differences live in DeviceProfile)."""

    sdk: str
    ops: frozenset[str]
    """ONNX ops TIDL accelerates (tidl.md §3 operator table). Min is an EltWise op in the §2 per-layer table; Constant
    is folded into its consumer; Cast is taken only at network inputs/outputs (rule TIDL061); Q/DQ carry the
    quantization."""
    standalone_unsupported: frozenset[str]
    """In the table, but "not as standalone layers" (tidl.md §3): Erf only inside GELU, ReduceMean only inside
    LayerNorm; Dropout and Identity are inference no-ops."""
    rank4_ops: frozenset[str]
    """At most 4 non-singleton variable dims for these, 6 for the others (tidl.md §3 "Common limit")."""
    per_tensor_weight_ops: frozenset[str]
    """Ops whose weights TIDL takes per-tensor on every device (tidl.md §2 per-layer table, weights column;
    unverified there)."""
    symmetric_input_ops: frozenset[str]
    """Layers whose activations TIDL treats as symmetric even on MMAv2 (tidl.md §2 per-layer table, activations
    column; unverified there)."""
    needs_qdq: frozenset[str]
    """Ops whose variable inputs must come from a DequantizeLinear (tidl.md §2 per-layer table, "needs Q/DQ around
    it"; unverified there)."""
    pass_through: frozenset[str]
    """Ops that need no Q/DQ of their own: quantization passes through them (tidl.md §2 table, last two rows)."""
    fused_into_next: dict[str, frozenset[str]]
    """Ops that may feed the listed consumers without their own output Q (tidl.md §2 "Exceptions documented")."""
    min_opset: int = 13
    """The first ai.onnx opset with per-axis QuantizeLinear/DequantizeLinear (tidl.md §2)."""
    max_opset: int = 19
    """TIDL is validated around ONNX 1.14 / ONNX Runtime 1.15: opset up to 19 (tidl.md §3 "Other compile limits")."""
    max_ir: int = 9
    """The highest IR version TIDL's ONNX reads (tidl.md §3 "Other compile limits")."""


_OPS_11_0: frozenset[str] = frozenset({
    "Conv",
    "AveragePool", "GlobalAveragePool", "MaxPool",
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Mish", "LeakyRelu", "Sqrt", "Exp", "Log", "Abs",
    "Floor", "Neg", "Pow", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "InstanceNormalization",
    "PRelu",
    "Add", "Mul", "Div", "Sub", "Max", "Sum", "Min",
    "Gemm", "MatMul", "Softmax", "BatchNormalization", "ConvTranspose", "Concat", "Slice", "Split",
    "Flatten", "Squeeze", "Unsqueeze", "Transpose", "DepthToSpace", "SpaceToDepth",
    "Reshape", "ArgMax", "Resize", "Upsample", "Pad", "ReduceMin", "ReduceMax", "Gather", "LayerNormalization",
    "GridSample", "TopK", "ScatterND", "ScatterElements", "DeformConv", "Clip", "Cast",
    "Dropout", "Identity", "Erf", "ReduceMean",
    "QuantizeLinear", "DequantizeLinear", "Constant",
})

_SPECS: dict[str, TidlSpec] = {
    "11.0": TidlSpec(
        sdk="11.0",
        ops=_OPS_11_0,
        standalone_unsupported=frozenset({"Dropout", "Identity", "Erf", "ReduceMean"}),
        rank4_ops=frozenset({
            "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm", "MatMul", "Resize", "Upsample", "Slice",
            "ArgMax", "ScatterND",
        }),
        per_tensor_weight_ops=frozenset({"ConvTranspose", "DeformConv", "BatchNormalization", "PRelu"}),
        symmetric_input_ops=frozenset({
            "ConvTranspose", "DeformConv", "BatchNormalization", "PRelu", "Mul", "Sub", "Div", "Max", "Min", "Sum",
            "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "Resize", "Upsample", "Sigmoid",
            "Tanh", "Gather", "ArgMax", "DepthToSpace", "SpaceToDepth", "Split", "Slice", "Pad", "Squeeze",
        }),
        needs_qdq=frozenset({
            "Conv", "ConvTranspose", "Gemm", "MatMul", "DeformConv", "BatchNormalization", "PRelu",
            "Add", "Mul", "Sub", "Div", "Max", "Min", "Sum", "Concat", "Softmax", "LayerNormalization",
            "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Resize", "Upsample", "Sigmoid", "Tanh",
            "Gather", "ArgMax", "DepthToSpace", "SpaceToDepth", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
        }),
        pass_through=frozenset({
            "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Pad", "Identity", "Dropout",
        }),
        fused_into_next={
            "Conv": frozenset({"Relu", "BatchNormalization", "Clip", "LeakyRelu"}),
            "ConvTranspose": frozenset({"Relu", "BatchNormalization", "Clip"}),
            "Gemm": frozenset({"Relu", "Clip"}),
            "MatMul": frozenset({"Add", "Relu"}),
            "Add": frozenset({"Relu", "Clip"}),
            "Mul": frozenset({"Relu", "Clip"}),
            "Sub": frozenset({"Relu", "Clip"}),
            "Div": frozenset({"Relu", "Clip", "Erf"}),
            "BatchNormalization": frozenset({"Relu", "Clip"}),
        },
    ),
}

SDK_VERSIONS: tuple[str, ...] = tuple(_SPECS)
DEFAULT_SDK = "11.0"


def get_spec(sdk: str | None = None) -> TidlSpec:
    """The facts of TIDL SDK ``sdk`` (``"11.0"``; None: :data:`DEFAULT_SDK`)."""
    key = DEFAULT_SDK if sdk is None else str(sdk).strip()
    spec = _SPECS.get(key)
    if spec is None:
        raise UsageError(f"unknown TIDL SDK version {sdk!r}; known: {', '.join(SDK_VERSIONS)}")
    return spec
