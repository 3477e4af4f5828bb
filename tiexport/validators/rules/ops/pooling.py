"""Constraint rules of the pooling and reduction layers: pooling (TIDL051), ArgMax (TIDL059), ReduceMin/ReduceMax
(TIDL067), TopK (TIDL069).

Each follows its row of tidl.md §3; a layer outside them is delegated to Arm.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.rules.ops.base import OpConstraintRule
from tiexport.validators.rules.ops.facts import Violation, attr_or_input_ints, hw, neg_axis, node_input, rank_of

__all__ = ["ArgMaxRule", "PoolRule", "ReduceMinMaxRule", "TopKRule"]


class PoolRule(OpConstraintRule):
    """TIDL051: a pooling layer outside TIDL's validated configurations.

    What (tidl.md §3 AveragePool/GlobalAveragePool/MaxPool row): dilations other than 1; storage_order 1; kernels
    other than 1x1, 2x2, 3x3 or strides other than 1, 2 (equal for H and W); GlobalAveragePool over a plane H*W >
    1024. Why: TIDL delegates these to Arm. Fix: use 2x2/3x3 pooling at stride 1/2 (cascade 3x3 for a 5x5); for a
    large global pool, reshape and MatMul with a constant 1/(H*W) vector.
    """

    id = "TIDL051"
    title = "pooling kernel/stride/attribute TIDL does not support"
    ops = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if node.op_type == "GlobalAveragePool":
            shape = ctx.static_shape(node_input(node, 0))
            if shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1024:
                yield Violation(
                    f"global average over a {shape[2]}x{shape[3]} plane ({shape[2] * shape[3]} > 1024 values)",
                    "reshape to [N, C, H*W] and MatMul with a constant 1/(H*W) vector, or pool down first",
                )
            return
        dil = [int(d) for d in ctx.attr(node, "dilations", [])]
        strict = device.spec.pooling_dilation_storage_rules  # written from 11.0
        if strict and any(d != 1 for d in dil):
            yield Violation(f"dilations {dil}: TIDL pools with dilation 1 only", "remove the pooling dilation")
        if strict and int(ctx.attr(node, "storage_order", 0)) != 0:
            yield Violation("storage_order 1 (column major): TIDL takes storage_order 0 only",
                            "export the pooling without storage_order")
        kernel = [int(k) for k in ctx.attr(node, "kernel_shape", [])]
        strides = [int(s) for s in ctx.attr(node, "strides", [1] * len(kernel))]
        if len(kernel) != 2:
            return
        square = kernel[0] == kernel[1] and len(set(strides)) == 1
        if not (square and kernel[0] in (1, 2, 3) and strides[0] in (1, 2)):
            yield Violation(
                f"{hw(kernel)} kernel at stride {hw(strides)}: TIDL's validated pooling is 1x1, 2x2 or 3x3 at "
                "stride 1 or 2",
                "cascade 3x3 poolings (two 3x3 stride-1 max pools equal one 5x5) or change the kernel",
            )


class ArgMaxRule(OpConstraintRule):
    """TIDL059: an ArgMax TIDL does not take.

    What: keepdims must be 1, axis -3 (channels of NCHW), select_last_index 0 (tidl.md §3 ArgMax row).
    Why: delegated to Arm. Fix: ``torch.argmax(x, dim=1, keepdim=True)`` on an NCHW tensor.
    """

    id = "TIDL059"
    title = "ArgMax keepdims/axis/select_last_index TIDL does not support"
    ops = frozenset({"ArgMax"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if int(ctx.attr(node, "keepdims", 1)) != 1:
            yield Violation("keepdims 0: TIDL's ArgMax takes keepdims 1 only", "use keepdim=True")
        if device.spec.argmax_select_last_index_rule and int(ctx.attr(node, "select_last_index", 0)):
            yield Violation("select_last_index 1 is unsupported by TIDL", "export with select_last_index 0")
        axis = int(ctx.attr(node, "axis", 0))
        neg = neg_axis(axis, rank_of(ctx, node_input(node, 0)))
        if neg is not None and neg != -3:
            yield Violation(f"axis {axis}: TIDL's ArgMax runs along axis -3 (channels) only",
                            "take the argmax over channels of an NCHW tensor (dim=1)")


class ReduceMinMaxRule(OpConstraintRule):
    """TIDL067: ReduceMin/ReduceMax not along height only, or without keepdims.

    What: TIDL reduces only along the height axis (-2) with keepdims 1 (tidl.md §3 ReduceMin/ReduceMax row).
    Why: delegated to Arm. Fix: transpose so the reduced axis is H, keep the dims; use MaxPool/GlobalMaxPool-like
    layers for spatial maxima.
    """

    id = "TIDL067"
    title = "ReduceMin/ReduceMax axes or keepdims TIDL does not support"
    ops = frozenset({"ReduceMin", "ReduceMax"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if int(ctx.attr(node, "keepdims", 1)) != 1:
            yield Violation("keepdims 0: TIDL reduces with keepdims 1 only", "use keepdim=True")
        rank = rank_of(ctx, node_input(node, 0))
        axes = attr_or_input_ints(ctx, node, "axes", 1)
        if axes is None and (len(node.input) < 2 or not node.input[1]):
            axes = list(range(rank)) if rank is not None else None  # no axes: reduce all
        if axes is None or rank is None:
            return
        neg = sorted({a - rank if a >= 0 else a for a in axes})
        if neg != [-2]:
            yield Violation(f"reduces axes {axes} of a rank-{rank} tensor; TIDL reduces along height (-2) only",
                            "reduce along the height axis only")


class TopKRule(OpConstraintRule):
    """TIDL069: a TopK TIDL does not take.

    What: sorted 1, K an initializer, along the height axis (-2) (tidl.md §3 TopK row).
    Why: delegated to Arm. Fix: ``torch.topk(x, k, dim=-2, sorted=True)`` with a constant k.
    """

    id = "TIDL069"
    title = "TopK sorted/K/axis TIDL does not support"
    ops = frozenset({"TopK"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if int(ctx.attr(node, "sorted", 1)) != 1:
            yield Violation("sorted 0: TIDL's TopK returns sorted results only", "use sorted=True")
        k = node_input(node, 1)
        if ctx.opset >= 10 and k and not ctx.is_const(k):
            yield Violation(f"K {k!r} is computed at run time; TIDL needs K as an initializer", "use a constant k")
        axis = int(ctx.attr(node, "axis", -1))
        neg = neg_axis(axis, rank_of(ctx, node_input(node, 0)))
        if neg is not None and neg != -2:
            yield Violation(f"axis {axis}: TIDL's TopK runs along height (-2) only", "take the top-k along dim=-2")
