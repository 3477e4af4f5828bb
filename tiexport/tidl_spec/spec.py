"""The facts of each TIDL SDK release that rules and passes share: :class:`TidlSpec`, by version.

Every fact carries where TI writes it (:mod:`tiexport.tidl_spec.sources`): the ONNX operator table of
TexasInstruments/edgeai-tidl-tools ``docs/supported_ops_rts_versions.md`` at the release branch (``rel_09_02``,
``rel_10_00``, ``rel_10_01``, ``rel_11_00``), row by row, and the "Supported model formats & operator versions" lines
of the same file for the ONNX / ONNX Runtime versions. Only line numbers and facts are kept here, never TI's text.

What differs between releases and is checked: which ONNX ops have a row (9.2 has no Sub, Div, Cast or
LayerNormalization row, and its TIDL_ResizeLayer row names ONNX "UpSample" only, read here as Upsample and Resize:
the row's constraints are Resize's and torch has exported Upsample as Resize since opset 10; 10.1 adds HardSwish,
Mish, TopK, Exp, Log...; 11.0 adds QuantizeLinear/DequantizeLinear, DeformConv, SpaceToDepth, Unsqueeze...), the
opset and IR ceilings (ONNX Runtime 1.14 / opset 18 up to 10.0, 1.15 / opset 19 from 10.1), and the per-operator
constraints listed as fields below (Softmax axes, ConvTranspose and depthwise kernels, the devices without 3x3
stride-3 Conv or DepthToSpace, LayerNormalization's axis, Resize's attribute rules, Clip's range, Gather's constant
data, GridSample's modes, MatMul's mixed signs on TDA4VM, Sub/Div with two variable inputs, ArgMax's
select_last_index, pooling dilations). Constraints not listed here are the same
in every release that has the op, or are checked as the 11.0 table writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tiexport.errors import UsageError
from tiexport.tidl_spec.sources import OPS_DOC, TOOLS_REPO, DocRef

__all__ = ["DEFAULT_SDK", "SDK_VERSIONS", "TidlSpec", "get_spec"]


def _frozen(d: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, eq=False)
class TidlSpec:
    """What one TIDL SDK release's import takes, with the lines of TI's docs that say so."""

    sdk: str
    branch: str
    """The edgeai-tidl-tools release branch the facts were read at."""
    commit: str
    op_lines: Mapping[str, int]
    """ONNX op -> line of its row in ``docs/supported_ops_rts_versions.md`` at :attr:`branch`."""
    fused_lines: Mapping[str, int]
    """Ops TIDL takes only inside a fused pattern (LayerNorm, GELU) -> line of the fused-combination row."""
    standalone_unsupported: frozenset[str]
    """Ops whose own row says "not supported as an individual operator" (11.0), or that only fused rows list."""
    max_opset: int
    max_ir: int
    """The highest opset / IR version of the ONNX and ONNX Runtime releases TIDL's tools ship with."""
    versions_line: int
    """Line of "ONNX Runtime - x.y (OPSET-n)" in the same file."""
    features_line: int
    """Line of the feature table's "Support for Asymmetric, Per Channel Quantization" row in the same file."""
    softmax_axes: tuple[str, ...] = ("W",)
    convtranspose_kernels: tuple[int, ...] = (4, 3, 2)
    convtranspose_group_1: bool = False
    depthwise: frozenset[tuple[int, int]] = frozenset()
    """(kernel, stride) pairs of square depthwise Conv TIDL takes."""
    conv_3x3_stride_3_unsupported_on: frozenset[str] = frozenset()
    depth_to_space_unsupported_on: frozenset[str] = frozenset()
    layernorm_width_only: bool = False
    resize_attribute_rules: bool = False
    """Axes, scale and coordinate-mode rules of Resize (first written in 11.0; older tables list mode, antialias
    and keep_aspect_ratio_policy only)."""
    clip_range_rule: bool = False
    gather_constant_data_unsupported: bool = False
    gather_1d_indices: bool = False
    gridsample_modes: tuple[str, ...] = ("nearest",)
    matmul_mixed_sign_tda4vm_unsupported: bool = False
    two_variable_inputs_unsupported: tuple[str, ...] = ("Sub", "Div")
    argmax_select_last_index_rule: bool = False
    pooling_dilation_storage_rules: bool = False
    max_num_subgraph_nodes: int | None = None
    """``advanced_options:max_num_subgraph_nodes`` default (first documented in 11.0's options table)."""
    max_num_subgraphs: int = 16
    rank4_ops: frozenset[str] = frozenset({
        "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm", "MatMul", "Resize", "Upsample", "Slice",
        "ArgMax", "ScatterND",
    })
    """At most 4 non-singleton variable dims for these rows (6 for the others), as the tables from 10.0 write it."""
    min_opset: int = 13
    """The first ai.onnx opset with per-axis QuantizeLinear/DequantizeLinear (ONNX operator specification)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ops(self) -> frozenset[str]:
        """Every ONNX op TIDL takes in some form at this release: the table's rows, the fused-only ops, Q/DQ (the
        prequantized import, docs/tidl_fsg_quantization.md) and Constant (folded into its consumer)."""
        return frozenset(self.op_lines) | frozenset(self.fused_lines) | {"QuantizeLinear", "DequantizeLinear",
                                                                          "Constant"}

    def op_ref(self, op: str) -> DocRef:
        """Where the operator table at this release says what ``op`` takes (its row, or the table itself)."""
        line = self.op_lines.get(op) or self.fused_lines.get(op)
        return DocRef(TOOLS_REPO, self.branch, OPS_DOC, line)

    def op_source(self, op: str) -> str:
        return self.op_ref(op).cite()

    @property
    def versions_source(self) -> str:
        return DocRef(TOOLS_REPO, self.branch, OPS_DOC, self.versions_line).cite()

    @property
    def features_source(self) -> str:
        """The "Support for Asymmetric, Per Channel Quantization" row of the device feature table (no TDA4VM)."""
        return DocRef(TOOLS_REPO, self.branch, OPS_DOC, self.features_line).cite()


_DEPTHWISE_10 = frozenset({(1, 2), (3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2)})
# 10.x and 11.0 list "5x5s2, 5x5s2" twice and no 5x5s1: taken as a typo for 5x5s1, which stays accepted.

_SPECS: dict[str, TidlSpec] = {
    "9.2": TidlSpec(
        sdk="9.2", branch="rel_09_02", commit="505768a4039e8d144207d333d6731a4ff47f1d75",
        op_lines=_frozen({
            "Add": 12, "ArgMax": 20, "AveragePool": 11, "BatchNormalization": 10, "Clip": 46, "Concat": 16,
            "Conv": 9, "ConvTranspose": 15, "DepthToSpace": 24, "Elu": 10, "Flatten": 19, "Gather": 32, "Gemm": 13,
            "GlobalAveragePool": 11, "HardSigmoid": 10, "LeakyRelu": 10, "MatMul": 13, "MaxPool": 11, "Mul": 12,
            "PRelu": 10, "Pad": 26, "Relu": 10, "Reshape": 30, "ScatterND": 31, "Sigmoid": 10, "Slice": 17,
            "Softmax": 14, "Split": 17, "Tanh": 10, "Transpose": 33, "Upsample": 23, "Resize": 23,
        }),
        # LayerNorm only as the pattern ReduceMean-Sub-Pow(2)-ReduceMean-Add-Sqrt-Div (line 34)
        fused_lines=_frozen({"ReduceMean": 34, "Pow": 34, "Sqrt": 34}),
        standalone_unsupported=frozenset({"ReduceMean", "Pow", "Sqrt"}),
        max_opset=18, max_ir=8, versions_line=56, features_line=63,
        convtranspose_kernels=(8, 4, 2),
        depthwise=frozenset({(3, 1), (5, 1), (7, 1), (3, 2)}),
        depth_to_space_unsupported_on=frozenset({"AM62A", "AM67A"}),
        gather_1d_indices=True,
    ),
    "10.0": TidlSpec(
        sdk="10.0", branch="rel_10_00", commit="efae61031b31aa2ba5491c03bb808216d3baef14",
        op_lines=_frozen({
            "Add": 15, "ArgMax": 38, "AveragePool": 32, "BatchNormalization": 36, "Cast": 13, "Clip": 14,
            "Concat": 17, "Conv": 43, "ConvTranspose": 35, "DepthToSpace": 27, "Div": 15, "Elu": 31, "Flatten": 48,
            "Gather": 25, "Gemm": 21, "GlobalAveragePool": 29, "GridSample": 34, "HardSigmoid": 16,
            "LayerNormalization": 18, "LeakyRelu": 12, "MatMul": 21, "MaxPool": 30, "Mul": 15, "PRelu": 28, "Pad": 45,
            "ReduceMax": 39, "ReduceMin": 42, "Relu": 26, "Reshape": 37, "Resize": 40, "ScatterElements": 44,
            "ScatterND": 46, "Sigmoid": 20, "Slice": 24, "Softmax": 23, "Split": 24, "Squeeze": 33, "Sub": 15,
            "Sum": 15, "Tanh": 22, "Transpose": 47, "Upsample": 41,
        }),
        fused_lines=_frozen({"Pow": 61, "ReduceMean": 62, "Erf": 63, "Sqrt": 64}),
        standalone_unsupported=frozenset({"Pow", "ReduceMean", "Erf", "Sqrt"}),
        max_opset=18, max_ir=8, versions_line=116, features_line=127,
        depthwise=_DEPTHWISE_10,
        conv_3x3_stride_3_unsupported_on=frozenset({"AM62A"}),
        depth_to_space_unsupported_on=frozenset({"AM62A", "AM67A"}),
    ),
    "10.1": TidlSpec(
        sdk="10.1", branch="rel_10_01", commit="19ac4e61b40890537ab67fb3036780f41a7ade3a",
        op_lines=_frozen({
            "Abs": 60, "Add": 15, "ArgMax": 38, "Asin": 59, "Asinh": 58, "AveragePool": 32, "BatchNormalization": 36,
            "Cast": 13, "Clip": 14, "Concat": 17, "Conv": 43, "ConvTranspose": 35, "DepthToSpace": 27, "Div": 15,
            "Elu": 31, "Exp": 57, "Flatten": 48, "Floor": 56, "Gather": 25, "Gemm": 21, "GlobalAveragePool": 29,
            "GridSample": 34, "HardSigmoid": 16, "HardSwish": 55, "LayerNormalization": 18, "LeakyRelu": 12,
            "Log": 54, "MatMul": 21, "Max": 15, "MaxPool": 30, "Mish": 53, "Mul": 15, "PRelu": 28, "Pad": 45,
            "Pow": 52, "ReduceMax": 39, "ReduceMin": 42, "Relu": 26, "Reshape": 37, "Resize": 40,
            "ScatterElements": 44, "ScatterND": 46, "Sigmoid": 20, "Sin": 51, "Slice": 24, "Softmax": 23,
            "Split": 24, "Sqrt": 50, "Squeeze": 33, "Sub": 15, "Sum": 15, "Tanh": 22, "TopK": 49, "Transpose": 47,
            "Upsample": 41,
        }),
        fused_lines=_frozen({"ReduceMean": 73, "Erf": 74}),
        standalone_unsupported=frozenset({"ReduceMean", "Erf"}),
        max_opset=19, max_ir=9, versions_line=126, features_line=137,
        depthwise=_DEPTHWISE_10,
        conv_3x3_stride_3_unsupported_on=frozenset({"AM62A"}),
        depth_to_space_unsupported_on=frozenset({"AM62A", "AM67A"}),
        clip_range_rule=True,
        gather_constant_data_unsupported=True,
        matmul_mixed_sign_tda4vm_unsupported=True,
    ),
    "11.0": TidlSpec(
        sdk="11.0", branch="rel_11_00", commit="95ba2c7ec62bbedeb637d7a5c0273fcede21cac9",
        op_lines=_frozen({
            "Abs": 59, "Acos": 65, "Add": 16, "ArgMax": 26, "Asin": 53, "Asinh": 54, "Atan": 66, "AveragePool": 13,
            "BatchNormalization": 20, "Cast": 52, "Clip": 44, "Concat": 22, "Conv": 12, "ConvTranspose": 21,
            "Cos": 69, "Cosh": 70, "DeformConv": 43, "DepthToSpace": 28, "DequantizeLinear": 47, "Div": 16,
            "Dropout": 25, "Elu": 36, "Erf": 46, "Exp": 61, "Flatten": 24, "Floor": 60, "Gather": 38, "Gemm": 17,
            "GlobalAveragePool": 13, "GridSample": 41, "HardSigmoid": 35, "HardSwish": 55, "Identity": 46,
            "InstanceNormalization": 63, "LayerNormalization": 40, "LeakyRelu": 45, "Log": 57, "MatMul": 18,
            "Max": 16, "MaxPool": 13, "Mish": 56, "Mul": 16, "Neg": 68, "PRelu": 15, "Pad": 30, "Pow": 51,
            "QuantizeLinear": 48, "ReduceMax": 31, "ReduceMean": 50, "ReduceMin": 31, "Relu": 14, "Reshape": 37,
            "Resize": 27, "ScatterElements": 32, "ScatterND": 32, "Sigmoid": 29, "Sin": 62, "Sinh": 67, "Slice": 23,
            "Softmax": 19, "SpaceToDepth": 64, "Split": 23, "Sqrt": 49, "Squeeze": 33, "Sub": 16, "Sum": 16,
            "Tan": 71, "Tanh": 34, "TopK": 42, "Transpose": 39, "Unsqueeze": 58, "Upsample": 27,
        }),
        fused_lines=_frozen({"ReduceMean": 84, "Erf": 85}),
        standalone_unsupported=frozenset({"Dropout", "Identity", "Erf", "ReduceMean"}),
        max_opset=19, max_ir=9, versions_line=134, features_line=145,
        softmax_axes=("W", "H"),
        convtranspose_kernels=(4, 2),
        convtranspose_group_1=True,
        depthwise=_DEPTHWISE_10 - {(1, 2)},
        conv_3x3_stride_3_unsupported_on=frozenset({"AM62A", "AM67A"}),
        layernorm_width_only=True,
        resize_attribute_rules=True,
        clip_range_rule=True,
        gather_constant_data_unsupported=True,
        gather_1d_indices=True,
        gridsample_modes=("nearest", "bilinear"),
        matmul_mixed_sign_tda4vm_unsupported=True,
        two_variable_inputs_unsupported=("Sub",),
        argmax_select_last_index_rule=True,
        pooling_dilation_storage_rules=True,
        max_num_subgraph_nodes=864,
    ),
}

SDK_VERSIONS: tuple[str, ...] = tuple(_SPECS)
DEFAULT_SDK = "11.0"
"""The latest release whose documents were read at their release branch (edgeai-tidl-tools ``rel_11_00``)."""


def get_spec(sdk: str | None = None) -> TidlSpec:
    """The facts of TIDL SDK ``sdk`` (``"9.2"``, ``"10.0"``, ``"10.1"``, ``"11.0"``; None: :data:`DEFAULT_SDK`).
    ``"11.00"`` and ``"11_00"`` are accepted as well."""
    if sdk is None:
        return _SPECS[DEFAULT_SDK]
    spec = _SPECS.get(sdk)
    if spec is not None:
        return spec
    key = str(sdk).strip().replace("_", ".")
    parts = key.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts[:2]):
        key = f"{int(parts[0])}.{int(parts[1])}"  # "11.00", "10_01", "09.02.06.00"
    spec = _SPECS.get(key)
    if spec is None:
        raise UsageError(f"unknown TIDL SDK version {sdk!r}; known: {', '.join(SDK_VERSIONS)}")
    return spec
