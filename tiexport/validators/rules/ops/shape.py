"""Constraint rules of the layout and indexing layers, and the limits every layer shares.

Concat (TIDL053), Reshape (TIDL057), Slice/Split with the patch-merging exception (TIDL058), Pad (TIDL056),
DepthToSpace/SpaceToDepth (TIDL071), Gather (TIDL068), ScatterND/ScatterElements (TIDL074), Cast placement
(TIDL061) and the non-singleton dimension limit of every TIDL layer (TIDL072, tidl.md §3 "Common limit"). Each
follows its row of tidl.md §3; a layer outside them is delegated to Arm.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.rules.ops.base import OpConstraintRule
from tiexport.validators.rules.ops.facts import (
    NO_LAYER,
    Violation,
    attr_or_input_ints,
    const_ints,
    const_value,
    decode,
    down,
    is_const_derived,
    neg_axis,
    node_input,
    rank_of,
    up,
)

__all__ = [
    "CastPlacementRule",
    "ConcatAxisRule",
    "DepthSpaceRule",
    "GatherRule",
    "PadRule",
    "RankLimitRule",
    "ReshapeRule",
    "ScatterRule",
    "SliceSplitRule",
]


class ConcatAxisRule(OpConstraintRule):
    """TIDL053: Concat along the batch axis or an axis before -3.

    What: TIDL concatenates along axis -3, -2 or -1 only, not batch (tidl.md §3 Concat row). Why: delegated to Arm.
    Fix: concatenate along channels (axis 1 of NCHW) or reshape so the concat axis is one of the last three.
    """

    id = "TIDL053"
    title = "Concat axis not -3, -2 or -1"
    ops = frozenset({"Concat"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        axis = int(ctx.attr(node, "axis", 0))
        rank = rank_of(ctx, node.output[0]) if node.output else None
        neg = neg_axis(axis, rank)
        if neg is None or rank is None:
            return
        if neg < -3 or (rank > 1 and neg == -rank):
            yield Violation(f"concatenation along axis {axis} of a rank-{rank} tensor; TIDL concatenates along "
                            "axis -3, -2 or -1, not batch", "concatenate along channels, height or width")


class ReshapeRule(OpConstraintRule):
    """TIDL057: a Reshape whose target shape is not constant, or with allowzero.

    What: the shape input must be constant; allowzero is unsupported (tidl.md §3 Reshape row).
    Why: delegated to Arm. Fix: export with static shapes and constant folding (torch.onnx.export with fixed input
    sizes; onnxsim), and without allowzero.
    """

    id = "TIDL057"
    title = "Reshape with a run-time shape or allowzero"
    ops = frozenset({"Reshape"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        shape = node_input(node, 1)
        if shape and not is_const_derived(ctx, shape):
            yield Violation(f"target shape {shape!r} is computed at run time; TIDL needs a constant shape",
                            "export with static shapes and constant folding so the shape is an initializer")
        if int(ctx.attr(node, "allowzero", 0)):
            yield Violation("allowzero 1 is unsupported by TIDL", "export the Reshape without allowzero")


def _patch_merging(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    """A strided Slice feeding (through other Slices) a Concat whose inputs all come from strided Slices."""
    frontier = [node]
    for _ in range(4):
        nxt: list[onnx.NodeProto] = []
        for n in frontier:
            for c in down(ctx, n.output[0]) if n.output else []:
                if c.op_type == "Concat":
                    return all(_strided_slice_chain(ctx, i) for i in c.input if i)
                if c.op_type == "Slice":
                    nxt.append(c)
        frontier = nxt
    return False


def _strided_slice_chain(ctx: ModelContext, tensor: str) -> bool:
    p = up(ctx, tensor)
    while p is not None and p.op_type == "Slice":
        steps = const_ints(ctx, node_input(p, 4))
        if steps is not None and any(s != 1 for s in steps):
            return True
        p = up(ctx, node_input(p, 0))
    return False


class SliceSplitRule(OpConstraintRule):
    """TIDL058: a Slice or Split TIDL does not take.

    What (tidl.md §3 Slice/Split row): starts/ends/axes/steps (Slice) or split sizes (Split) not constant 1-D
    tensors; an input of more than 4 dimensions ("the variable (Must be <=4 dimensions) input", TI's table, rel_11_00
    docs/supported_ops_rts_versions.md L23: timm's attention unbinds q, k, v from a 5-D tensor) or with a batch
    larger than 1; a Slice step other than 1 outside a patch-merging pattern (strided slices concatenated, as in
    Swin). Why: delegated to Arm. Fix: export with constant slice bounds and batch 1, split q, k, v along the last
    axis before reshaping to heads.
    """

    id = "TIDL058"
    title = "Slice/Split with run-time parameters, more than 4 dimensions, batch > 1 or a step"
    ops = frozenset({"Slice", "Split"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        params = ("starts", "ends", "axes", "steps") if node.op_type == "Slice" else ("split",)
        for offset, name in enumerate(params, start=1):
            t = node_input(node, offset)
            if not t:
                continue
            if not is_const_derived(ctx, t):
                yield Violation(f"{name} {t!r} is computed at run time; TIDL needs constant 1-D {name}",
                                "export with constant slice parameters (static shapes, constant folding)")
            elif (r := rank_of(ctx, t)) is not None and r != 1:
                yield Violation(f"{name} has rank {r}; TIDL needs a 1-D {name}", "make the parameter 1-D")
        shape = ctx.static_shape(node_input(node, 0))
        if shape is not None and len(shape) > 4:
            fixable = False  # True for the chain SplitQkvBeforeHeadsPass rewrites (it checks the rest)
            transpose = up(ctx, node_input(node, 0))
            if transpose is not None and transpose.op_type == "Transpose":
                # timm's Attention: qkv(x).reshape(B, N, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
                fix = ("split before the permute: q, k, v = qkv(x).chunk(3, dim=-1), then reshape and permute each "
                       "to [B, heads, N, dim] (4-D)")
                reshape = up(ctx, node_input(transpose, 0))
                if reshape is not None and reshape.op_type == "Reshape":
                    fix = "tiexport fix rewrites this Reshape -> Transpose -> split chain; in PyTorch, " + fix
                    fixable = True
            else:
                fix = "reshape to at most 4 dimensions, with the sliced axis not first"
            yield Violation(f"input has {len(shape)} dimensions ({'x'.join(map(str, shape))}); TIDL's "
                            f"{node.op_type} takes at most 4, batch 1", fix, fixable=fixable)
        elif shape is not None and len(shape) >= 2 and shape[0] != 1:
            yield Violation(f"input batch is {shape[0]}; TIDL's {node.op_type} takes batch 1 only",
                            "run with batch 1 (or reshape so the batch is 1)")
        if node.op_type == "Slice":
            steps = const_ints(ctx, node_input(node, 4))
            if steps is not None and any(s != 1 for s in steps) and not _patch_merging(ctx, node):
                yield Violation(f"step {steps}: TIDL slices with step 1 except inside patch merging",
                                "use a strided conv/pooling, or step 1")


class PadRule(OpConstraintRule):
    """TIDL056: a Pad TIDL does not take.

    What: mode other than constant; padding of an axis other than H and W (tidl.md §3 Pad row).
    Why: delegated to Arm. Fix: use zero/constant padding of H and W only (reflect padding runs on Arm).
    """

    id = "TIDL056"
    title = "Pad mode or axes TIDL does not support"
    ops = frozenset({"Pad"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        mode = str(decode(ctx.attr(node, "mode", "constant")))
        if mode != "constant":
            yield Violation(f"mode {mode!r}: TIDL pads in constant mode only", "use constant (zero) padding")
        rank = rank_of(ctx, node_input(node, 0))
        pads = attr_or_input_ints(ctx, node, "pads", 1)
        if rank is None or pads is None:
            return
        axes = const_ints(ctx, node_input(node, 3)) if node_input(node, 3) else list(range(rank))
        if axes is None or len(pads) != 2 * len(axes):
            return
        n = len(axes)
        padded = sorted({a % rank for i, a in enumerate(axes) if pads[i] or pads[i + n]})
        other = [a for a in padded if a < rank - 2]
        if other:
            yield Violation(f"pads axis {other[0]} of a rank-{rank} tensor; TIDL pads only H and W",
                            "pad only the last two axes")


class DepthSpaceRule(OpConstraintRule):
    """TIDL071: a DepthToSpace/SpaceToDepth on a non-4-D tensor or with dims not divisible by the block.

    What: 4-D input; DepthToSpace channels divisible by blocksize^2, SpaceToDepth H and W divisible by blocksize
    (the DepthToSpace/SpaceToDepth rows of 11.0); DepthToSpace on AM62A/AM67A up to 10.1 ("AM62A & AM67A currently
    do not support DepthToSpace"). Why: delegated to Arm. Fix: pick shapes divisible by the block.
    """

    id = "TIDL071"
    title = "DepthToSpace/SpaceToDepth shape TIDL does not support"
    ops = frozenset({"DepthToSpace", "SpaceToDepth"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if node.op_type == "DepthToSpace" and device.name in device.spec.depth_to_space_unsupported_on:
            yield Violation(f"TIDL {device.spec.sdk} does not support DepthToSpace on {device.name}",
                            "use TIDL 11.0 or later, or a transposed convolution / Resize")
            return
        shape = ctx.static_shape(node_input(node, 0))
        if shape is None:
            return
        if len(shape) != 4:
            yield Violation(f"rank-{len(shape)} input; TIDL's {node.op_type} takes 4-D tensors",
                            "reshape to NCHW first")
            return
        b = int(ctx.attr(node, "blocksize", 1))
        _, c, h, w = shape
        if node.op_type == "DepthToSpace" and c % (b * b):
            yield Violation(f"{c} channels are not divisible by blocksize^2 = {b * b}",
                            "use a channel count divisible by blocksize^2")
        if node.op_type == "SpaceToDepth" and (h % b or w % b):
            yield Violation(f"H x W = {h}x{w} not divisible by blocksize {b}", "pad H and W to a multiple of the block")


class GatherRule(OpConstraintRule):
    """TIDL068: a Gather TIDL does not take.

    What: data must not be constant (embedding tables run on Arm; from 10.1), indices 1-D (9.2 and 11.0), input rank
    > 1 (the Gather rows). Why: delegated to Arm. Fix: index with a 1-D index list (``x[:, [i]]`` rather than
    ``x[:, i]``).
    """

    id = "TIDL068"
    title = "Gather with constant data, non-1-D indices or a 1-D input"
    ops = frozenset({"Gather"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        data, idx = node_input(node, 0), node_input(node, 1)
        spec = device.spec
        if spec.gather_constant_data_unsupported and is_const_derived(ctx, data):
            yield Violation("data is a constant (a lookup table); TIDL gathers from variable tensors only",
                            "precompute the lookup, or leave it on Arm")
        r = rank_of(ctx, idx)
        rd = rank_of(ctx, data)
        index = ctx.const(idx) if idx and ctx.is_const(idx) else None
        producer = ctx.producer_of(data)
        # the dynamo exporter's layout-restoring as_strided (FoldIdentityGatherPass folds it into a Reshape)
        in_order = (rd == 1 and producer is not None and producer.op_type == "Reshape" and index is not None
                    and np.array_equal(np.asarray(index).ravel(), np.arange(np.asarray(index).size)))
        folds = "tiexport fix folds this in-order Gather into a Reshape"
        if spec.gather_1d_indices and r is not None and r != 1:
            if in_order:
                yield Violation(f"indices have rank {r}; TIDL gathers with 1-D indices only", folds, fixable=True)
            elif r == 0 and index is not None:  # x[:, i]: ScalarGatherToSlicePass
                yield Violation(f"indices have rank {r}; TIDL gathers with 1-D indices only",
                                "tiexport fix writes it as a one-element Slice and a Squeeze", fixable=True)
            else:
                yield Violation(f"indices have rank {r}; TIDL gathers with 1-D indices only",
                                "index with a 1-D list (x[:, [i]] instead of x[:, i]) and reshape after")
        if rd is not None and rd <= 1:
            if in_order:
                yield Violation("gathers from a 1-D tensor; TIDL needs input rank > 1", folds, fixable=True)
            else:
                yield Violation("gathers from a 1-D tensor; TIDL needs input rank > 1", "gather from a 2-D+ tensor")


class ScatterRule(OpConstraintRule):
    """TIDL074: a ScatterND/ScatterElements TIDL does not take.

    What (tidl.md §3 ScatterND/ScatterElements row): ScatterElements not along width (last axis); reduction other
    than none (ScatterND: mul is the one unsupported); data not a zero constant. Why: delegated to Arm.
    Fix: scatter into a zero constant along the last axis without reduction.
    """

    id = "TIDL074"
    title = "Scatter axis/reduction/data TIDL does not support"
    ops = frozenset({"ScatterND", "ScatterElements"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        reduction = str(decode(ctx.attr(node, "reduction", "none")))
        bad = reduction == "mul" if node.op_type == "ScatterND" else reduction != "none"
        if bad:
            yield Violation(f"reduction {reduction!r} is unsupported by TIDL's {node.op_type}",
                            "scatter without reduction")
        data = node_input(node, 0)
        value = const_value(ctx, data)
        if value is None or any(v != 0.0 for v in value):
            yield Violation("data is not a zero constant; TIDL scatters into a zero constant only",
                            "scatter into zeros and combine with the tensor afterwards")
        if node.op_type == "ScatterElements":
            axis = int(ctx.attr(node, "axis", 0))
            neg = neg_axis(axis, rank_of(ctx, data))
            if neg is not None and neg != -1:
                yield Violation(f"axis {axis}: TIDL's ScatterElements runs along width (the last axis) only",
                                "scatter along the last axis")


class CastPlacementRule(OpConstraintRule):
    """TIDL061: a Cast inside the network.

    What: TIDL takes Cast only at network inputs or outputs (tidl.md §3 Cast row). Why: delegated to Arm.
    Fix: keep the whole network in one float type; cast only the inputs/outputs.
    """

    id = "TIDL061"
    title = "Cast not at a network input or output"
    ops = frozenset({"Cast"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        inputs = {vi.name for vi in ctx.graph_inputs}
        at_input = node_input(node, 0) in inputs
        at_output = any(o in ctx.graph_output_names for o in node.output)
        if not at_input and not at_output:
            yield Violation("Cast inside the network: TIDL takes Cast only at network inputs or outputs",
                            "remove the cast (keep one float type inside the network)")


class RankLimitRule(OpConstraintRule):
    """TIDL072: a tensor with more non-singleton dims than TIDL handles for that layer.

    What: at most 4 non-singleton variable dims for Conv/Pool/Gemm/MatMul/Resize/Slice/ArgMax/ScatterND, at most 6
    for the other layers; Unsqueeze outputs at most 6 dims (tidl.md §3 "Common limit" and the Unsqueeze row).
    Only fully known static shapes are counted. Why: delegated to Arm. Fix: fold the extra dims (reshape) so the
    layer sees at most 4 (or 6) non-singleton dims.
    """

    id = "TIDL072"
    title = "too many non-singleton dims for a TIDL layer"
    ops = frozenset()  # every TIDL layer of the device's SDK: see takes()

    def takes(self, op_type: str, device: DeviceProfile) -> bool:
        return op_type in device.spec.ops and op_type not in NO_LAYER and op_type not in ("Dropout", "Identity")

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        limit = 4 if node.op_type in device.spec.rank4_ops else 6
        tensors = [i for i in node.input if i and not is_const_derived(ctx, i)] + [o for o in node.output if o]
        for t in tensors:
            shape = ctx.static_shape(t)
            if shape is None:
                continue
            big = [d for d in shape if d > 1]
            if len(big) > limit:
                yield Violation(f"tensor {t!r} of shape {list(shape)} has {len(big)} non-singleton dims; TIDL's "
                                f"{node.op_type} takes at most {limit}",
                                f"reshape so the layer sees at most {limit} non-singleton dims")
                return
        if node.op_type == "Unsqueeze" and node.output:
            r = rank_of(ctx, node.output[0])
            if r is not None and r > 6:
                yield Violation(f"output has {r} dims; TIDL's Unsqueeze outputs at most 6", "keep tensors at <= 6-D")
