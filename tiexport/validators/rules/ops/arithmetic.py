"""Constraint rules of the arithmetic layers: eltwise (TIDL064), MatMul (TIDL065), Gemm (TIDL055), Softmax
(TIDL054), LayerNormalization (TIDL066), BatchNormalization (TIDL063), PRelu (TIDL070), Clip (TIDL060).

Each follows its row of tidl.md §3; a layer outside them is delegated to Arm.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.rules.ops.base import OpConstraintRule
from tiexport.validators.rules.ops.facts import (
    Violation,
    const_value,
    in_fused_pattern,
    is_const_derived,
    neg_axis,
    node_input,
    rank_of,
    shape_of,
)

__all__ = [
    "BatchNormRule",
    "ClipRule",
    "EltwiseRule",
    "GemmRule",
    "LayerNormRule",
    "MatMulRule",
    "PReluRule",
    "SoftmaxAxisRule",
]


class EltwiseRule(OpConstraintRule):
    """TIDL064: an elementwise Add/Mul/Div/Sub/Max/Min/Sum TIDL does not take.

    What (tidl.md §3 Add/Mul/Div/Sub/Max/Sum row): more or fewer than 2 inputs; variable inputs whose shapes do not
    broadcast; Add/Mul broadcasting a variable input over the batch; Sub of two variable inputs (except the mean
    subtraction of a decomposed LayerNorm, which TIDL fuses); a Sub constant that is not a scalar or a 1-D vector
    along channels or width; Div of two variable inputs up to 10.1 (11.0 names Sub only). Why: delegated to Arm.
    Fix: chain two-input ops; match batch sizes; compute
    ``a - b`` as ``a + (-1 * b)``; make Sub constants per-channel or scalar.
    """

    id = "TIDL064"
    title = "eltwise input count, broadcasting or Sub form TIDL does not support"
    ops = frozenset({"Add", "Mul", "Div", "Sub", "Max", "Min", "Sum"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        ins = [i for i in node.input if i]
        if len(ins) != 2:
            yield Violation(f"{len(ins)} inputs: TIDL's eltwise layers take exactly 2",
                            "chain two-input operations")
            return
        variable = [i for i in ins if not is_const_derived(ctx, i)]
        shapes = [ctx.static_shape(i) for i in variable]
        if len(variable) == 2 and shapes[0] is not None and shapes[1] is not None:
            try:
                np.broadcast_shapes(shapes[0], shapes[1])
            except ValueError:
                yield Violation(f"input shapes {list(shapes[0])} and {list(shapes[1])} do not broadcast",
                                "make the inputs the same shape")
                return
        out = ctx.static_shape(node.output[0]) if node.output else None
        if node.op_type in ("Add", "Mul") and out is not None and len(out) >= 2 and out[0] > 1:
            for t, s in zip(variable, shapes, strict=True):
                if s is not None and (len(s) < len(out) or s[0] == 1):
                    yield Violation(f"input {t!r} of shape {list(s)} is broadcast over the batch of {out[0]}; "
                                    f"TIDL's {node.op_type} does not broadcast over batch",
                                    "expand the input to the full batch, or run with batch 1")
                    break
        if node.op_type in device.spec.two_variable_inputs_unsupported and len(variable) == 2:
            if not in_fused_pattern(ctx, node):
                yield Violation(f"{node.op_type} of two variable inputs is unsupported by TIDL {device.spec.sdk}",
                                "compute a - b as a + (-1 * b), or Sub a constant" if node.op_type == "Sub"
                                else "multiply by a reciprocal computed elsewhere, or divide by a constant")
            return
        if node.op_type != "Sub" or len(variable) == 2:
            return
        const = next((i for i in ins if is_const_derived(ctx, i)), None)
        c_shape = shape_of(ctx, const) if const else None
        if const is None or c_shape is None or out is None:
            return
        big = [(len(c_shape) - i, d) for i, d in enumerate(c_shape) if d != 1]  # (position from the end, size)
        if not big:
            return  # a scalar
        rank = len(out)
        along = {1: "width", 3: "channel"} if rank == 4 else {1: "width"}
        ok = len(big) == 1 and big[0][0] in along and out[rank - big[0][0]] == big[0][1]
        if not ok:
            yield Violation(f"Sub constant of shape {list(c_shape)}: TIDL takes a scalar or a 1-D constant along "
                            "channels or width", "make the constant per-channel ([C, 1, 1]) or a scalar")


class MatMulRule(OpConstraintRule):
    """TIDL065: a MatMul whose B input has fewer than 2 dims.

    What: TIDL's MatMul needs B with >= 2 dims (tidl.md §3 MatMul row; sign rules are TIDL024).
    Why: delegated to Arm. Fix: unsqueeze B to [K, 1] (matrix-vector as matrix-matrix).
    """

    id = "TIDL065"
    title = "MatMul with a 1-D B"
    ops = frozenset({"MatMul"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        r = rank_of(ctx, node_input(node, 1))
        if r is not None and r < 2:
            yield Violation(f"B has rank {r}; TIDL's MatMul needs B with at least 2 dims",
                            "reshape B to [K, 1] and squeeze the result")


class GemmRule(OpConstraintRule):
    """TIDL055: a Gemm with attributes or a bias shape TIDL does not take.

    What: transA must be 0, alpha and beta 1; bias C of shape [N] or [1, N] (tidl.md §3 Gemm row).
    Why: delegated to Arm. Fix: export nn.Linear as is (torch writes transB=1, alpha=beta=1); fold alpha into the
    weights; reshape the bias to [N].
    """

    id = "TIDL055"
    title = "Gemm transA/alpha/beta or bias shape TIDL does not support"
    ops = frozenset({"Gemm"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if int(ctx.attr(node, "transA", 0)):
            yield Violation("transA 1: TIDL's Gemm takes transA 0 only", "transpose A explicitly before the Gemm")
        for name in ("alpha", "beta"):
            v = float(ctx.attr(node, name, 1.0))
            if v != 1.0:
                yield Violation(f"{name} {v:g}: TIDL's Gemm takes {name} 1 only",
                                f"fold {name} into the {'weight' if name == 'alpha' else 'bias'}")
        c = node_input(node, 2)
        c_shape = shape_of(ctx, c) if c else None
        b_shape = shape_of(ctx, node_input(node, 1))
        if c_shape is None or b_shape is None or len(b_shape) != 2:
            return
        n = b_shape[0] if int(ctx.attr(node, "transB", 0)) else b_shape[1]
        if tuple(c_shape) not in ((n,), (1, n)):
            yield Violation(f"bias shape {list(c_shape)}; TIDL takes a Gemm bias of shape [{n}] or [1, {n}]",
                            f"reshape the bias to [{n}]")


class SoftmaxAxisRule(OpConstraintRule):
    """TIDL054: Softmax along an axis other than H or W.

    What: TIDL's Softmax runs only along the width (last) axis up to 10.1, along width or height (the last two) from
    11.0 (the Softmax row of each release); never along channels or batch. Why: delegated to Arm. Fix: transpose so
    the softmax axis is last, or use dim=-1 in PyTorch.
    """

    id = "TIDL054"
    title = "Softmax not along H or W"
    ops = frozenset({"Softmax"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        axis = int(ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1))
        rank = rank_of(ctx, node_input(node, 0))
        neg = neg_axis(axis, rank)
        if neg is None or rank is None:
            return
        spec = device.spec
        allowed = (-1, -2) if "H" in spec.softmax_axes else (-1,)
        if neg not in allowed or neg == -rank:
            where = "H or W (the last two axes, not batch)" if len(allowed) == 2 else "W (the last axis) only"
            yield Violation(f"softmax along axis {axis} of a rank-{rank} tensor; TIDL {spec.sdk}'s Softmax runs along "
                            f"{where}", "move the softmax axis last (transpose) or use dim=-1")


class LayerNormRule(OpConstraintRule):
    """TIDL066: a LayerNormalization not over the last axis, or with a scale/bias of another shape.

    What: from 11.0, TIDL normalizes only over the width (last) axis, with scale/bias of shape [N] or [1, N] (the
    LayerNormalization row; 10.x only limits the rank, 9.2 has no LayerNormalization row: TIDL040 then).
    Why: delegated to Arm. Fix: ``nn.LayerNorm(last_dim)`` on [..., N] tensors.
    """

    id = "TIDL066"
    title = "LayerNormalization axis or scale shape TIDL does not support"
    ops = frozenset({"LayerNormalization"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if not device.spec.layernorm_width_only:
            return
        x = node_input(node, 0)
        rank = rank_of(ctx, x)
        axis = int(ctx.attr(node, "axis", -1))
        neg = neg_axis(axis, rank)
        if neg is not None and neg != -1:
            yield Violation(f"normalizes from axis {axis}; TIDL's LayerNorm normalizes over the last axis only",
                            "normalize over the last dimension only (nn.LayerNorm(last_dim))")
            return
        shape = ctx.static_shape(x)
        if not shape:  # unknown, or a scalar (which the checker reports)
            return
        n = shape[-1]
        for idx, what in ((1, "scale"), (2, "bias")):
            t = node_input(node, idx)
            s = shape_of(ctx, t) if t else None
            if s is not None and tuple(s) not in ((n,), (1, n)):
                yield Violation(f"{what} shape {list(s)}; TIDL takes [{n}] or [1, {n}]", f"reshape the {what} to [{n}]")


class BatchNormRule(OpConstraintRule):
    """TIDL063: BatchNormalization in training mode.

    What: TIDL takes BatchNormalization with training_mode 0 only (tidl.md §3 BatchNormalization row).
    Why: delegated to Arm. Fix: export the model in eval mode (``model.eval()``).
    """

    id = "TIDL063"
    title = "BatchNormalization with training_mode 1"
    ops = frozenset({"BatchNormalization"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if int(ctx.attr(node, "training_mode", 0)):
            yield Violation("training_mode 1: TIDL takes inference BatchNormalization only",
                            "export with model.eval() (training_mode 0)")


class PReluRule(OpConstraintRule):
    """TIDL070: a PRelu whose slope is computed at run time.

    What: the slope must be constant (tidl.md §3 PRelu row). Why: delegated to Arm. Fix: a learned
    ``nn.PReLU`` exports its slope as an initializer; do not compute it.
    """

    id = "TIDL070"
    title = "PRelu slope not constant"
    ops = frozenset({"PRelu"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        slope = node_input(node, 1)
        if slope and not is_const_derived(ctx, slope):
            yield Violation(f"slope {slope!r} is computed at run time; TIDL needs a constant slope",
                            "use nn.PReLU (constant slope) or LeakyRelu")


class ClipRule(OpConstraintRule):
    """TIDL060: a Clip whose range does not contain 0 as TIDL requires.

    What: TIDL's Clip needs min <= 0 < max (the Clip row from 10.1; 9.2 and 10.0 write no such rule); bounds
    computed at run time are not checked.
    Why: delegated to Arm. Fix: ReLU6-style ranges (0, 6) work; shift the tensor otherwise.
    """

    id = "TIDL060"
    title = "Clip range without min <= 0 < max"
    ops = frozenset({"Clip"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        if not device.spec.clip_range_rule:
            return
        lo: float | None
        hi: float | None
        if ctx.opset < 11:
            lo, hi = ctx.attr(node, "min"), ctx.attr(node, "max")
        else:
            lo_v, hi_v = const_value(ctx, node_input(node, 1)), const_value(ctx, node_input(node, 2))
            lo = lo_v[0] if lo_v and len(lo_v) == 1 else None
            hi = hi_v[0] if hi_v and len(hi_v) == 1 else None
        if lo is not None and lo > 0:
            yield Violation(f"min {lo:g} > 0: TIDL's Clip needs min <= 0 < max", "clip with min <= 0")
        if hi is not None and hi <= 0:
            yield Violation(f"max {hi:g} <= 0: TIDL's Clip needs min <= 0 < max", "clip with max > 0")
