"""Operator rules: which nodes TIDL offloads, the per-operator constraints that decide it, and the TIDL partition.

One source of truth (tidl.md §3): the operator table (``device.spec.ops``, :mod:`tiexport.tidl_spec`) and the
constraint rules below feed
:func:`node_support`, which says why a node would *not* be offloaded (an empty list: TIDL takes it). The rules
report the same reasons as findings, and :func:`partition` groups the offloaded nodes into TIDL subgraphs.

A node TIDL cannot take is not an import failure: TIDL's ONNX Runtime delegate leaves it to ONNX Runtime on the Arm
cores and splits the graph around it (tidl.md §3 "Anything else runs on the Arm cores ... a subgraph split, not an
error"), so op findings are warnings. The exception is the compile limit ``max_num_subgraphs`` <= 16 (tidl.md §3
"Other compile limits"), an error.

Shapes come from the shared :class:`~tiexport.context.ModelContext`; when a shape or a parameter a rule
needs is unknown (not inferable, or computed at run time), the rule says nothing rather than guess.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import is_power_of_two
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule

__all__ = [
    "OP_CONSTRAINT_RULES",
    "ArgMaxRule",
    "BatchNormRule",
    "CastPlacementRule",
    "ClipRule",
    "ConcatAxisRule",
    "ConvRule",
    "ConvTransposeRule",
    "DeformConvRule",
    "DepthSpaceRule",
    "EltwiseRule",
    "GatherRule",
    "GemmRule",
    "GridSampleRule",
    "LayerNormRule",
    "MatMulRule",
    "OpConstraintRule",
    "PReluRule",
    "PadRule",
    "Partition",
    "PoolRule",
    "RankLimitRule",
    "ReduceMinMaxRule",
    "ReshapeRule",
    "ResizeRule",
    "ScatterRule",
    "SliceSplitRule",
    "SoftmaxAxisRule",
    "SubgraphLimitRule",
    "TopKRule",
    "UnsupportedOpRule",
    "Violation",
    "node_support",
    "partition",
]

log = logging.getLogger(__name__)

_ARM = "; runs on Arm (ONNX Runtime)"
# Ops that never become TIDL layers of their own and are not counted as rank-limited layers.
_NO_LAYER = frozenset({"QuantizeLinear", "DequantizeLinear", "Constant", "Cast"})


@dataclass(frozen=True)
class Violation:
    """One reason a node is not offloaded to TIDL (message without the rule id; the rule adds it to findings)."""

    message: str
    hint: str
    fixable: bool = False


# ---------------------------------------------------------------------------------------------------- model facts
@dataclass
class _Facts:
    """What every op rule needs about one model, computed once per ModelContext (not per device)."""

    index: dict[int, int]
    """id(node) -> position in ctx.nodes."""
    const: frozenset[str]
    """Constant-derived tensors: initializers, Constant outputs, and outputs of nodes fed only by those."""
    fused: frozenset[int]
    """Positions of nodes inside a recognised GELU (Erf) or decomposed LayerNorm (ReduceMean, mean Sub) pattern."""
    support: dict[DeviceProfile, list[list[tuple[str, Violation]]]] = field(default_factory=dict)


def _facts(ctx: ModelContext) -> _Facts:
    # Cached on the context itself, not in a module-level table: validate is called from several threads at once.
    facts: _Facts | None = ctx.cache.get(__name__)
    if facts is None:
        facts = _Facts(index={id(n): i for i, n in enumerate(ctx.nodes)}, const=_const_tensors(ctx), fused=frozenset())
        ctx.cache[__name__] = facts
        facts.fused = frozenset(_gelu_erfs(ctx) | _layernorm_nodes(ctx))
    return facts


def _const_tensors(ctx: ModelContext) -> frozenset[str]:
    const = set(ctx.initializers) | set(ctx.constant_nodes)
    for node in ctx.nodes:
        # Shape reads a variable tensor; its value is known only with static shapes, and TIDL wants real constants.
        ins = [i for i in node.input if i]
        if ins and node.op_type != "Shape" and all(i in const for i in ins):
            const.update(o for o in node.output if o)
    return frozenset(const)


def _position(ctx: ModelContext, node: onnx.NodeProto) -> int | None:
    pos = _facts(ctx).index.get(id(node))
    if pos is not None:
        return pos
    # A node object from outside ctx.nodes (another protobuf wrapper of the same node): find it by its outputs.
    out = next((o for o in node.output if o), None)
    return ctx.producer.get(out) if out else None


def _is_const(ctx: ModelContext, tensor: str) -> bool:
    return tensor in _facts(ctx).const


def _in_fused_pattern(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    pos = _position(ctx, node)
    return pos is not None and pos in _facts(ctx).fused


# Pattern matching looks through Q -> DQ pairs: exporters put them inside GELU/LayerNorm as often as not.
def _source(ctx: ModelContext, tensor: str) -> str:
    """The float tensor behind ``tensor``: x for DQ(Q(x)), else the tensor itself."""
    dq = ctx.producer_of(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input:
        q = ctx.producer_of(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input:
            return q.input[0]
    return tensor


def _up(ctx: ModelContext, tensor: str) -> onnx.NodeProto | None:
    return ctx.producer_of(_source(ctx, tensor))


def _down(ctx: ModelContext, tensor: str) -> list[onnx.NodeProto]:
    """Consumers of ``tensor``, with Q -> DQ pairs skipped."""
    out: list[onnx.NodeProto] = []
    for c in ctx.consumers_of(tensor):
        if c.op_type == "QuantizeLinear" and c.output:
            for dq in ctx.consumers_of(c.output[0]):
                if dq.op_type == "DequantizeLinear" and dq.output:
                    out.extend(ctx.consumers_of(dq.output[0]))
        else:
            out.append(c)
    return out


def _const_operand(ctx: ModelContext, node: onnx.NodeProto) -> tuple[str, str] | None:
    """(variable input, constant input) of a two-input node with exactly one constant operand."""
    ins = [i for i in node.input if i]
    if len(ins) != 2:
        return None
    a, b = ins
    if _is_const(ctx, b) and not _is_const(ctx, a):
        return a, b
    if _is_const(ctx, a) and not _is_const(ctx, b):
        return b, a
    return None


def _gelu_erfs(ctx: ModelContext) -> set[int]:
    """Erf nodes inside x * 0.5 * (1 + erf(x / sqrt(2))) (any order of the two Muls): TIDL fuses them into GELU."""
    found: set[int] = set()
    for pos, erf in enumerate(ctx.nodes):
        if erf.op_type != "Erf" or not erf.input or not erf.output:
            continue
        scale = _up(ctx, erf.input[0])
        pair = _const_operand(ctx, scale) if scale is not None and scale.op_type in ("Div", "Mul") else None
        if pair is None:
            continue
        x = _source(ctx, pair[0])
        for add in _down(ctx, erf.output[0]):
            if add.op_type != "Add" or _const_operand(ctx, add) is None:
                continue
            muls = [m for m in _down(ctx, add.output[0]) if m.op_type == "Mul"]
            muls += [m2 for m in muls for m2 in _down(ctx, m.output[0]) if m2.op_type == "Mul"]
            if any(_reads_x(ctx, m, x) for m in muls):
                found.add(pos)
    return found


def _reads_x(ctx: ModelContext, mul: onnx.NodeProto, x: str) -> bool:
    """True when a Mul reads x, or 0.5 * x (a Mul of x and a constant)."""
    for inp in mul.input:
        src = _source(ctx, inp)
        if src == x:
            return True
        p = ctx.producer_of(src)
        if p is not None and p.op_type == "Mul" and any(_source(ctx, i) == x for i in p.input):
            return True
    return False


def _layernorm_nodes(ctx: ModelContext) -> set[int]:
    """ReduceMean and Sub nodes of a decomposed LayerNorm: d = x - mean(x); var = mean(d * d) (or Pow(d, 2)).

    TIDL fuses the pattern into one LayerNorm layer (tidl.md §3 "ReduceMean inside LayerNorm are fused"), so the
    ReduceMeans are not standalone and the Sub of two variable inputs is not an eltwise Sub.
    """
    found: set[int] = set()
    pos_of = _facts(ctx).index
    for sub in ctx.nodes:
        if sub.op_type != "Sub" or len(sub.input) != 2 or not sub.output:
            continue
        x, m = sub.input
        mean = _up(ctx, m)
        if mean is None or mean.op_type != "ReduceMean" or not mean.input:
            continue
        if _source(ctx, mean.input[0]) != _source(ctx, x):
            continue
        d = sub.output[0]
        for sq in _down(ctx, d):
            squared = (sq.op_type == "Mul" and all(_source(ctx, i) == d for i in sq.input)) or (
                sq.op_type == "Pow" and len(sq.input) == 2 and _const_value(ctx, sq.input[1]) == [2.0])
            if not squared or not sq.output:
                continue
            for var in _down(ctx, sq.output[0]):
                if var.op_type == "ReduceMean":
                    found.update(pos_of[id(n)] for n in (mean, sub, var))
    return found


# ---------------------------------------------------------------------------------------------------- small helpers
def _const_value(ctx: ModelContext, tensor: str) -> list[float] | None:
    """A small constant as a flat list (only real constants: initializers and Constant outputs)."""
    if not tensor or not ctx.is_const(tensor):
        return None
    v = ctx.const(tensor)
    if v is None or v.size > 4096:
        return None
    return [float(x) for x in np.asarray(v).ravel()]


def _const_ints(ctx: ModelContext, tensor: str) -> list[int] | None:
    v = _const_value(ctx, tensor)
    return None if v is None else [int(x) for x in v]


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _shape_of(ctx: ModelContext, tensor: str) -> tuple[int, ...] | None:
    """Static shape of a tensor, from inference or (for constants) the initializer."""
    s = ctx.static_shape(tensor)
    if s is None and ctx.is_const(tensor):
        s = ctx.const_shape(tensor)
    return s


def _rank(ctx: ModelContext, tensor: str) -> int | None:
    return ctx.rank(tensor) if tensor else None


def _neg_axis(axis: int, rank: int | None) -> int | None:
    """The axis counted from the end (-1 = last), or None when it cannot be known."""
    if axis < 0:
        return axis
    return None if rank is None else axis - rank


def _hw(values: Sequence[int]) -> str:
    return "x".join(str(v) for v in values)


def _attr_or_input_ints(ctx: ModelContext, node: onnx.NodeProto, attr: str, index: int) -> list[int] | None:
    """A list parameter that moved from an attribute to an input across opsets (axes, split, pads...)."""
    value = ctx.attr(node, attr)
    if value is not None:
        return [int(v) for v in value]
    tensor = _input(node, index)
    return _const_ints(ctx, tensor) if tensor else None


# ---------------------------------------------------------------------------------------------------- TIDL040
class UnsupportedOpRule(Rule):
    """TIDL040: an operator TIDL does not accelerate; ONNX Runtime runs it on the Arm cores.

    What: an op outside TIDL's operator table (tidl.md §3 table), a node in a custom domain, or Dropout / Identity /
    Erf / ReduceMean used as a standalone layer (tidl.md §3 "Dropout, Identity, Erf, ReduceMean: not as standalone
    layers (Erf inside GELU, ReduceMean inside LayerNorm are fused)").
    Why: "Anything else runs on the Arm cores through ONNX Runtime (a subgraph split, not an error)" (tidl.md §3):
    a warning, since every such node costs a TIDL/Arm round trip. On a device without accelerator (AM62, tidl.md §1
    "no accelerator: everything runs on the Arm cores") the model gets one info finding and nothing else.
    Fix: replace the op with a supported one (x.mean((2, 3)) -> GlobalAveragePool...); ``tiexport fix`` removes
    Dropout and Identity.
    """

    id = "TIDL040"
    title = "operator not accelerated by TIDL (runs on Arm)"
    category = "unsupported_op"
    severity = "warning"
    needs_qdq = False
    needs_accelerator = False

    def violation(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Violation | None:
        """Why this node's op type is not a TIDL layer, or None when it is (its constraints aside)."""
        op = node.op_type
        spec = device.spec
        if node.domain not in ("", "ai.onnx"):
            return Violation(
                f"{node.domain}.{op} is not a TIDL operator{_ARM}, not an import failure",
                "custom-domain ops always run on Arm; export with standard ONNX ops for full offload",
            )
        if op not in spec.ops:
            return Violation(
                f"{op} is not in TIDL's operator table{_ARM}, not an import failure",
                "each Arm node splits the TIDL subgraph; replace it with a TIDL-supported op for full offload",
            )
        if op in ("Dropout", "Identity"):
            return Violation(f"standalone {op} is not a TIDL layer{_ARM}",
                             f"tiexport fix removes the {op} (a no-op at inference)", fixable=True)
        if op in spec.standalone_unsupported and not _in_fused_pattern(ctx, node):
            if op == "Erf":
                return Violation(f"Erf outside a GELU pattern is not a TIDL layer{_ARM}",
                                 "TIDL fuses Erf only in x * 0.5 * (1 + erf(x / sqrt(2))); export nn.GELU as such")
            return Violation(
                f"ReduceMean outside a LayerNorm pattern is not a TIDL layer{_ARM}",
                "use GlobalAveragePool for a mean over H and W (x.mean((2, 3)) -> adaptive_avg_pool2d)",
            )
        return None

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        if not device.accelerator:
            yield self.finding(
                ctx, None,
                f"{device.name} has no TIDL accelerator: the whole model runs in ONNX Runtime on Arm",
                "choose an AM6xA/TDA4 device for acceleration", severity="info",
            )
            return
        yield from _findings_of(self, ctx, device, "")


# ---------------------------------------------------------------------------------------------------- TIDL05x-07x
class OpConstraintRule(Rule):
    """Base of the per-operator constraint rules: ``violations`` for nodes whose op is in ``ops``.

    Constraint findings are warnings: a node TIDL cannot take is delegated to Arm (tidl.md §3 first line).
    """

    category = "op_constraint"
    severity = "warning"
    needs_qdq = False
    ops: ClassVar[frozenset[str]]

    def takes(self, op_type: str, device: DeviceProfile) -> bool:
        """Whether this rule constrains nodes of ``op_type`` on ``device``."""
        return op_type in self.ops

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        raise NotImplementedError

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        yield from _findings_of(self, ctx, device, _ARM)


def _one_variable_input(ctx: ModelContext, node: onnx.NodeProto) -> Iterator[Violation]:
    """Conv-like layers take one variable input: weight and bias must be constants (tidl.md §3 Conv, ConvTranspose)."""
    for idx, what in ((1, "weight"), (2, "bias")):
        t = _input(node, idx)
        if t and not _is_const(ctx, t):
            yield Violation(f"{what} {t!r} is computed at run time; TIDL's {node.op_type} takes one variable input",
                            f"make the {what} a constant initializer (behind its DequantizeLinear)")


def _kernel(ctx: ModelContext, node: onnx.NodeProto) -> list[int] | None:
    k = ctx.attr(node, "kernel_shape")
    if k is not None:
        return [int(v) for v in k]
    w = _shape_of(ctx, _input(node, 1))
    return None if w is None else list(w[2:])


class ConvRule(OpConstraintRule):
    """TIDL050: a Conv TIDL cannot take.

    What (tidl.md §3 Conv row): weight or bias computed at run time (one variable input); weight dims differing from
    ``kernel_shape``; unequal H/W strides; depthwise (group == input channels) other than 3x3/5x5/7x7 at stride 1 or
    2; kernel > 7 with stride 2; stride 4 with anything but 11x11; input width < max(pad_left, pad_right). 3x3
    stride-3 conv on AM62A/AM67A (tidl.md §1, ``DeviceProfile.conv_3x3_stride_3``).
    Why: TIDL delegates such a Conv to Arm. Fix: change the layer in PyTorch (e.g. a 9x9 depthwise as two 5x5).
    """

    id = "TIDL050"
    title = "Conv kernel/stride/pad combination TIDL does not support"
    ops = frozenset({"Conv"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        yield from _one_variable_input(ctx, node)
        w_shape = _shape_of(ctx, _input(node, 1))
        k_attr = ctx.attr(node, "kernel_shape")
        if k_attr is not None and w_shape is not None and list(w_shape[2:]) != [int(v) for v in k_attr]:
            yield Violation(f"kernel_shape {list(k_attr)} differs from the weight's spatial dims {list(w_shape[2:])}",
                            "re-export; the weight and kernel_shape must agree")
        kernel = _kernel(ctx, node)
        if kernel is None or len(kernel) != 2:
            return  # 1-D/3-D convolutions: tidl.md gives no geometry rules for them
        kh, kw = kernel
        strides = [int(s) for s in ctx.attr(node, "strides", [1, 1])]
        if len(strides) == 2 and strides[0] != strides[1]:
            yield Violation(f"strides {_hw(strides)} differ for H and W; TIDL needs equal strides",
                            "use the same stride along H and W")
            return
        s = strides[0] if strides else 1
        group = int(ctx.attr(node, "group", 1))
        depthwise = group > 1 and w_shape is not None and len(w_shape) == 4 and w_shape[1] == 1
        if depthwise and not (kh == kw and kh in (3, 5, 7) and s in (1, 2)):
            yield Violation(f"depthwise {kh}x{kw} stride {s}: TIDL takes depthwise 3x3, 5x5 or 7x7 at stride 1 or 2",
                            "use a 3x3/5x5/7x7 depthwise kernel at stride 1 or 2 (e.g. stack two 5x5 for a 9x9)")
        if max(kh, kw) > 7 and s == 2:
            yield Violation(f"{kh}x{kw} kernel with stride 2: kernels larger than 7 are unsupported at stride 2",
                            "use a kernel of at most 7x7 at stride 2, or stride 1 followed by a pooling")
        if s == 4 and (kh, kw) != (11, 11):
            yield Violation(f"stride 4 with a {kh}x{kw} kernel: TIDL takes stride 4 only with 11x11",
                            "use two stride-2 layers instead of one stride-4 layer")
        if (kh, kw, s) == (3, 3, 3) and not device.conv_3x3_stride_3:
            yield Violation(f"3x3 stride-3 conv is unsupported on {device.name}",
                            "use stride 1 or 2 (e.g. a 3x3 stride-1 conv and a pooling)")
        pads = ctx.attr(node, "pads")
        in_shape = ctx.static_shape(_input(node, 0))
        if pads is not None and len(pads) == 4 and in_shape is not None and len(in_shape) == 4:
            width, pad = in_shape[3], max(int(pads[1]), int(pads[3]))
            if width < pad:
                yield Violation(f"padding {pad} is larger than the input width {width}",
                                "pad at most the input width (or pad explicitly before the conv)")


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
            shape = ctx.static_shape(_input(node, 0))
            if shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1024:
                yield Violation(
                    f"global average over a {shape[2]}x{shape[3]} plane ({shape[2] * shape[3]} > 1024 values)",
                    "reshape to [N, C, H*W] and MatMul with a constant 1/(H*W) vector, or pool down first",
                )
            return
        dil = [int(d) for d in ctx.attr(node, "dilations", [])]
        if any(d != 1 for d in dil):
            yield Violation(f"dilations {dil}: TIDL pools with dilation 1 only", "remove the pooling dilation")
        if int(ctx.attr(node, "storage_order", 0)) != 0:
            yield Violation("storage_order 1 (column major): TIDL takes storage_order 0 only",
                            "export the pooling without storage_order")
        kernel = [int(k) for k in ctx.attr(node, "kernel_shape", [])]
        strides = [int(s) for s in ctx.attr(node, "strides", [1] * len(kernel))]
        if len(kernel) != 2:
            return
        square = kernel[0] == kernel[1] and len(set(strides)) == 1
        if not (square and kernel[0] in (1, 2, 3) and strides[0] in (1, 2)):
            yield Violation(
                f"{_hw(kernel)} kernel at stride {_hw(strides)}: TIDL's validated pooling is 1x1, 2x2 or 3x3 at "
                "stride 1 or 2",
                "cascade 3x3 poolings (two 3x3 stride-1 max pools equal one 5x5) or change the kernel",
            )


class ResizeRule(OpConstraintRule):
    """TIDL052: a Resize/Upsample TIDL cannot take.

    What (tidl.md §3 Resize/Upsample row): mode other than nearest/linear; resizing an axis other than H and W;
    scales < 1, not a power of 2 or different for H and W; antialias; keep_aspect_ratio_policy other than stretch;
    coordinate_transformation_mode other than half_pixel/pytorch_half_pixel (nearest needs nearest_mode
    round_prefer_ceil there) or asymmetric (nearest with nearest_mode floor only; linear not allowed); exclude_outside.
    Scales given as ``sizes`` are checked against the inferred input shape (skipped when it is unknown).
    Fix: upsample by 2 (or 4...) with nearest/asymmetric/floor (PyTorch's ``nn.Upsample(scale_factor=2)``) or
    bilinear with align_corners=False.
    """

    id = "TIDL052"
    title = "Resize mode/scale/coordinate mode TIDL does not support"
    ops = frozenset({"Resize", "Upsample"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        mode = str(_decode(ctx.attr(node, "mode", "nearest")))
        if mode == "bilinear":  # Upsample-7's spelling of linear
            mode = "linear"
        if mode not in ("nearest", "linear"):
            yield Violation(f"mode {mode!r}: TIDL resizes with nearest or linear only",
                            "use nearest or bilinear interpolation")
        yield from self._scales(ctx, node)
        if node.op_type == "Upsample":
            return  # Upsample has no further attributes
        if int(ctx.attr(node, "antialias", 0)):
            yield Violation("antialias 1: TIDL resizes without antialiasing", "export with antialias=False")
        policy = str(_decode(ctx.attr(node, "keep_aspect_ratio_policy", "stretch")))
        if policy != "stretch":
            yield Violation(f"keep_aspect_ratio_policy {policy!r}: TIDL takes 'stretch' only",
                            "resize with explicit scales")
        if int(ctx.attr(node, "exclude_outside", 0)):
            yield Violation("exclude_outside 1: TIDL takes exclude_outside 0 only", "export with exclude_outside=0")
        ctm = str(_decode(ctx.attr(node, "coordinate_transformation_mode", "half_pixel")))
        nearest_mode = str(_decode(ctx.attr(node, "nearest_mode", "round_prefer_floor")))
        hint = ("nearest: asymmetric + floor (nn.Upsample default); linear: pytorch_half_pixel "
                "(align_corners=False)")
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            if mode == "nearest" and nearest_mode != "round_prefer_ceil":
                yield Violation(f"nearest with {ctm} and nearest_mode {nearest_mode!r}: TIDL needs round_prefer_ceil",
                                hint)
        elif ctm == "asymmetric":
            if mode == "linear":
                yield Violation("linear with coordinate_transformation_mode 'asymmetric' is unsupported", hint)
            elif mode == "nearest" and nearest_mode != "floor":
                yield Violation(f"nearest with asymmetric and nearest_mode {nearest_mode!r}: TIDL needs floor", hint)
        else:
            yield Violation(f"coordinate_transformation_mode {ctm!r}: TIDL takes half_pixel, pytorch_half_pixel or "
                            "asymmetric", hint)

    def _scales(self, ctx: ModelContext, node: onnx.NodeProto) -> Iterator[Violation]:
        x = _input(node, 0)
        rank = _rank(ctx, x)
        scales: list[float] | None = None
        if node.op_type == "Upsample":
            attr = ctx.attr(node, "scales")
            scales = [float(s) for s in attr] if attr is not None else _const_value(ctx, _input(node, 1))
        else:
            idx = 1 if ctx.opset < 11 else 2
            raw = _const_value(ctx, _input(node, idx))
            if raw:
                scales = raw
            else:
                sizes = _const_value(ctx, _input(node, 3)) if ctx.opset >= 11 else None
                in_shape = ctx.static_shape(x)
                axes = ctx.attr(node, "axes")
                if sizes and in_shape is not None:
                    dims = [in_shape[a] for a in axes] if axes is not None else list(in_shape)
                    if len(dims) == len(sizes):
                        scales = [s / d for s, d in zip(sizes, dims, strict=True)]
        if not scales or rank is None:
            return
        axes = ctx.attr(node, "axes")
        full = [1.0] * rank
        if axes is not None and len(axes) == len(scales):
            for a, s in zip(axes, scales, strict=True):
                full[int(a) % rank] = s
        elif len(scales) == rank:
            full = scales
        else:
            return
        other = [i for i in range(rank - 2) if full[i] != 1.0]
        if other:
            yield Violation(f"resizes axis {other[0]} (scale {full[other[0]]:g}); TIDL resizes only H and W",
                            "resize only the last two (H, W) axes")
        if rank < 2:
            return
        sh, sw = full[-2], full[-1]
        shown = f"{sh:g}x{sw:g}"
        if sh != sw:
            yield Violation(f"scales {shown} differ for H and W; TIDL needs equal H/W scales",
                            "use the same scale factor for H and W")
        elif sh < 1:
            yield Violation(f"scale {sh:g} < 1 (downsampling); TIDL's Resize only upsamples",
                            "downsample with a strided conv or pooling instead")
        elif not bool(is_power_of_two(np.asarray([sh]))[0]):
            yield Violation(f"scale {sh:g} is not a power of 2; TIDL takes 2, 4, 8... only",
                            "upsample by a power of 2 (e.g. 2x then a conv), or resize on Arm")


def _decode(v: object) -> object:
    # "replace": a STRING attribute need not be valid UTF-8, and such a mode is simply not one TIDL knows
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


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
        rank = _rank(ctx, node.output[0]) if node.output else None
        neg = _neg_axis(axis, rank)
        if neg is None or rank is None:
            return
        if neg < -3 or (rank > 1 and neg == -rank):
            yield Violation(f"concatenation along axis {axis} of a rank-{rank} tensor; TIDL concatenates along "
                            "axis -3, -2 or -1, not batch", "concatenate along channels, height or width")


class SoftmaxAxisRule(OpConstraintRule):
    """TIDL054: Softmax along an axis other than H or W.

    What: TIDL's Softmax runs only along the H or W axis (the last two, tidl.md §3 Softmax row); not along
    channels or batch. Why: delegated to Arm. Fix: transpose so the softmax axis is last, or use dim=-1 in PyTorch.
    """

    id = "TIDL054"
    title = "Softmax not along H or W"
    ops = frozenset({"Softmax"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        axis = int(ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1))
        rank = _rank(ctx, _input(node, 0))
        neg = _neg_axis(axis, rank)
        if neg is None or rank is None:
            return
        if neg not in (-1, -2) or neg == -rank:
            yield Violation(f"softmax along axis {axis} of a rank-{rank} tensor; TIDL's Softmax runs along H or W "
                            "(the last two axes, not batch)", "move the softmax axis last (transpose) or use dim=-1")


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
        c = _input(node, 2)
        c_shape = _shape_of(ctx, c) if c else None
        b_shape = _shape_of(ctx, _input(node, 1))
        if c_shape is None or b_shape is None or len(b_shape) != 2:
            return
        n = b_shape[0] if int(ctx.attr(node, "transB", 0)) else b_shape[1]
        if tuple(c_shape) not in ((n,), (1, n)):
            yield Violation(f"bias shape {list(c_shape)}; TIDL takes a Gemm bias of shape [{n}] or [1, {n}]",
                            f"reshape the bias to [{n}]")


class PadRule(OpConstraintRule):
    """TIDL056: a Pad TIDL does not take.

    What: mode other than constant; padding of an axis other than H and W (tidl.md §3 Pad row).
    Why: delegated to Arm. Fix: use zero/constant padding of H and W only (reflect padding runs on Arm).
    """

    id = "TIDL056"
    title = "Pad mode or axes TIDL does not support"
    ops = frozenset({"Pad"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        mode = str(_decode(ctx.attr(node, "mode", "constant")))
        if mode != "constant":
            yield Violation(f"mode {mode!r}: TIDL pads in constant mode only", "use constant (zero) padding")
        rank = _rank(ctx, _input(node, 0))
        pads = _attr_or_input_ints(ctx, node, "pads", 1)
        if rank is None or pads is None:
            return
        axes = _const_ints(ctx, _input(node, 3)) if _input(node, 3) else list(range(rank))
        if axes is None or len(pads) != 2 * len(axes):
            return
        n = len(axes)
        padded = sorted({a % rank for i, a in enumerate(axes) if pads[i] or pads[i + n]})
        other = [a for a in padded if a < rank - 2]
        if other:
            yield Violation(f"pads axis {other[0]} of a rank-{rank} tensor; TIDL pads only H and W",
                            "pad only the last two axes")


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
        shape = _input(node, 1)
        if shape and not _is_const(ctx, shape):
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
            for c in _down(ctx, n.output[0]) if n.output else []:
                if c.op_type == "Concat":
                    return all(_strided_slice_chain(ctx, i) for i in c.input if i)
                if c.op_type == "Slice":
                    nxt.append(c)
        frontier = nxt
    return False


def _strided_slice_chain(ctx: ModelContext, tensor: str) -> bool:
    p = _up(ctx, tensor)
    while p is not None and p.op_type == "Slice":
        steps = _const_ints(ctx, _input(p, 4))
        if steps is not None and any(s != 1 for s in steps):
            return True
        p = _up(ctx, _input(p, 0))
    return False


class SliceSplitRule(OpConstraintRule):
    """TIDL058: a Slice or Split TIDL does not take.

    What (tidl.md §3 Slice/Split row): starts/ends/axes/steps (Slice) or split sizes (Split) not constant 1-D
    tensors; a batch larger than 1; a Slice step other than 1 outside a patch-merging pattern (strided slices
    concatenated, as in Swin). Why: delegated to Arm. Fix: export with constant slice bounds and batch 1.
    """

    id = "TIDL058"
    title = "Slice/Split with run-time parameters, batch > 1 or a step"
    ops = frozenset({"Slice", "Split"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        params = ("starts", "ends", "axes", "steps") if node.op_type == "Slice" else ("split",)
        for offset, name in enumerate(params, start=1):
            t = _input(node, offset)
            if not t:
                continue
            if not _is_const(ctx, t):
                yield Violation(f"{name} {t!r} is computed at run time; TIDL needs constant 1-D {name}",
                                "export with constant slice parameters (static shapes, constant folding)")
            elif (r := _rank(ctx, t)) is not None and r != 1:
                yield Violation(f"{name} has rank {r}; TIDL needs a 1-D {name}", "make the parameter 1-D")
        shape = ctx.static_shape(_input(node, 0))
        if shape is not None and len(shape) >= 2 and shape[0] != 1:
            yield Violation(f"input batch is {shape[0]}; TIDL's {node.op_type} takes batch 1 only",
                            "run with batch 1 (or reshape so the batch is 1)")
        if node.op_type == "Slice":
            steps = _const_ints(ctx, _input(node, 4))
            if steps is not None and any(s != 1 for s in steps) and not _patch_merging(ctx, node):
                yield Violation(f"step {steps}: TIDL slices with step 1 except inside patch merging",
                                "use a strided conv/pooling, or step 1")


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
        if int(ctx.attr(node, "select_last_index", 0)):
            yield Violation("select_last_index 1 is unsupported by TIDL", "export with select_last_index 0")
        axis = int(ctx.attr(node, "axis", 0))
        neg = _neg_axis(axis, _rank(ctx, _input(node, 0)))
        if neg is not None and neg != -3:
            yield Violation(f"axis {axis}: TIDL's ArgMax runs along axis -3 (channels) only",
                            "take the argmax over channels of an NCHW tensor (dim=1)")


class ClipRule(OpConstraintRule):
    """TIDL060: a Clip whose range does not contain 0 as TIDL requires.

    What: TIDL's Clip needs min <= 0 < max (tidl.md §3 Clip row); bounds computed at run time are not checked.
    Why: delegated to Arm. Fix: ReLU6-style ranges (0, 6) work; shift the tensor otherwise.
    """

    id = "TIDL060"
    title = "Clip range without min <= 0 < max"
    ops = frozenset({"Clip"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        lo: float | None
        hi: float | None
        if ctx.opset < 11:
            lo, hi = ctx.attr(node, "min"), ctx.attr(node, "max")
        else:
            lo_v, hi_v = _const_value(ctx, _input(node, 1)), _const_value(ctx, _input(node, 2))
            lo = lo_v[0] if lo_v and len(lo_v) == 1 else None
            hi = hi_v[0] if hi_v and len(hi_v) == 1 else None
        if lo is not None and lo > 0:
            yield Violation(f"min {lo:g} > 0: TIDL's Clip needs min <= 0 < max", "clip with min <= 0")
        if hi is not None and hi <= 0:
            yield Violation(f"max {hi:g} <= 0: TIDL's Clip needs min <= 0 < max", "clip with max > 0")


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
        at_input = _input(node, 0) in inputs
        at_output = any(o in ctx.graph_output_names for o in node.output)
        if not at_input and not at_output:
            yield Violation("Cast inside the network: TIDL takes Cast only at network inputs or outputs",
                            "remove the cast (keep one float type inside the network)")


class ConvTransposeRule(OpConstraintRule):
    """TIDL062: a ConvTranspose TIDL does not take.

    What (tidl.md §3 ConvTranspose row): weight or bias computed at run time; kernel other than 2x2 or 4x4 at
    stride 2 (an older TI doc also lists 3x3, the message says so); group other than 1.
    Why: delegated to Arm. Fix: ``nn.ConvTranspose2d(k=2 or 4, stride=2)``, or nearest Resize x2 then a Conv.
    """

    id = "TIDL062"
    title = "ConvTranspose kernel/stride/group TIDL does not support"
    ops = frozenset({"ConvTranspose"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        yield from _one_variable_input(ctx, node)
        group = int(ctx.attr(node, "group", 1))
        if group != 1:
            yield Violation(f"group {group}: TIDL's ConvTranspose takes group 1 only",
                            "use a dense ConvTranspose or Resize + depthwise Conv")
        kernel = _kernel(ctx, node)
        strides = [int(s) for s in ctx.attr(node, "strides", [1, 1])]
        if kernel is None or len(kernel) != 2:
            return
        if not (kernel[0] == kernel[1] and kernel[0] in (2, 4) and strides == [2, 2]):
            older = " (an older TI doc also lists 3x3)" if kernel == [3, 3] and strides == [2, 2] else ""
            yield Violation(f"{_hw(kernel)} kernel at stride {_hw(strides)}: TIDL takes 2x2 or 4x4 at stride 2{older}",
                            "use kernel 2 or 4 with stride 2, or a nearest Resize x2 followed by a Conv")


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


class EltwiseRule(OpConstraintRule):
    """TIDL064: an elementwise Add/Mul/Div/Sub/Max/Min/Sum TIDL does not take.

    What (tidl.md §3 Add/Mul/Div/Sub/Max/Sum row): more or fewer than 2 inputs; variable inputs whose shapes do not
    broadcast; Add/Mul broadcasting a variable input over the batch; Sub of two variable inputs (except the mean
    subtraction of a decomposed LayerNorm, which TIDL fuses); a Sub constant that is not a scalar or a 1-D vector
    along channels or width. Why: delegated to Arm. Fix: chain two-input ops; match batch sizes; compute
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
        variable = [i for i in ins if not _is_const(ctx, i)]
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
        if node.op_type != "Sub":
            return
        if len(variable) == 2:
            if not _in_fused_pattern(ctx, node):
                yield Violation("Sub of two variable inputs is unsupported by TIDL",
                                "compute a - b as a + (-1 * b), or Sub a constant")
            return
        const = next((i for i in ins if _is_const(ctx, i)), None)
        c_shape = _shape_of(ctx, const) if const else None
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
        r = _rank(ctx, _input(node, 1))
        if r is not None and r < 2:
            yield Violation(f"B has rank {r}; TIDL's MatMul needs B with at least 2 dims",
                            "reshape B to [K, 1] and squeeze the result")


class LayerNormRule(OpConstraintRule):
    """TIDL066: a LayerNormalization not over the last axis, or with a scale/bias of another shape.

    What: TIDL normalizes only over the width (last) axis, with scale/bias of shape [N] or [1, N] (tidl.md §3
    LayerNormalization row). Why: delegated to Arm. Fix: ``nn.LayerNorm(last_dim)`` on [..., N] tensors.
    """

    id = "TIDL066"
    title = "LayerNormalization axis or scale shape TIDL does not support"
    ops = frozenset({"LayerNormalization"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        x = _input(node, 0)
        rank = _rank(ctx, x)
        axis = int(ctx.attr(node, "axis", -1))
        neg = _neg_axis(axis, rank)
        if neg is not None and neg != -1:
            yield Violation(f"normalizes from axis {axis}; TIDL's LayerNorm normalizes over the last axis only",
                            "normalize over the last dimension only (nn.LayerNorm(last_dim))")
            return
        shape = ctx.static_shape(x)
        if not shape:  # unknown, or a scalar (which the checker reports)
            return
        n = shape[-1]
        for idx, what in ((1, "scale"), (2, "bias")):
            t = _input(node, idx)
            s = _shape_of(ctx, t) if t else None
            if s is not None and tuple(s) not in ((n,), (1, n)):
                yield Violation(f"{what} shape {list(s)}; TIDL takes [{n}] or [1, {n}]", f"reshape the {what} to [{n}]")


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
        rank = _rank(ctx, _input(node, 0))
        axes = _attr_or_input_ints(ctx, node, "axes", 1)
        if axes is None and (len(node.input) < 2 or not node.input[1]):
            axes = list(range(rank)) if rank is not None else None  # no axes: reduce all
        if axes is None or rank is None:
            return
        neg = sorted({a - rank if a >= 0 else a for a in axes})
        if neg != [-2]:
            yield Violation(f"reduces axes {axes} of a rank-{rank} tensor; TIDL reduces along height (-2) only",
                            "reduce along the height axis only")


class GatherRule(OpConstraintRule):
    """TIDL068: a Gather TIDL does not take.

    What: data must not be constant (embedding tables run on Arm), indices 1-D, input rank > 1 (tidl.md §3 Gather
    row). Why: delegated to Arm. Fix: index with a 1-D index list (``x[:, [i]]`` rather than ``x[:, i]``).
    """

    id = "TIDL068"
    title = "Gather with constant data, non-1-D indices or a 1-D input"
    ops = frozenset({"Gather"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        data, idx = _input(node, 0), _input(node, 1)
        if _is_const(ctx, data):
            yield Violation("data is a constant (a lookup table); TIDL gathers from variable tensors only",
                            "precompute the lookup, or leave it on Arm")
        r = _rank(ctx, idx)
        if r is not None and r != 1:
            yield Violation(f"indices have rank {r}; TIDL gathers with 1-D indices only",
                            "index with a 1-D list (x[:, [i]] instead of x[:, i]) and reshape after")
        rd = _rank(ctx, data)
        if rd is not None and rd <= 1:
            yield Violation("gathers from a 1-D tensor; TIDL needs input rank > 1", "gather from a 2-D+ tensor")


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
        k = _input(node, 1)
        if ctx.opset >= 10 and k and not ctx.is_const(k):
            yield Violation(f"K {k!r} is computed at run time; TIDL needs K as an initializer", "use a constant k")
        axis = int(ctx.attr(node, "axis", -1))
        neg = _neg_axis(axis, _rank(ctx, _input(node, 0)))
        if neg is not None and neg != -2:
            yield Violation(f"axis {axis}: TIDL's TopK runs along height (-2) only", "take the top-k along dim=-2")


class PReluRule(OpConstraintRule):
    """TIDL070: a PRelu whose slope is computed at run time.

    What: the slope must be constant (tidl.md §3 PRelu row). Why: delegated to Arm. Fix: a learned
    ``nn.PReLU`` exports its slope as an initializer; do not compute it.
    """

    id = "TIDL070"
    title = "PRelu slope not constant"
    ops = frozenset({"PRelu"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        slope = _input(node, 1)
        if slope and not _is_const(ctx, slope):
            yield Violation(f"slope {slope!r} is computed at run time; TIDL needs a constant slope",
                            "use nn.PReLU (constant slope) or LeakyRelu")


class DepthSpaceRule(OpConstraintRule):
    """TIDL071: a DepthToSpace/SpaceToDepth on a non-4-D tensor or with dims not divisible by the block.

    What: 4-D input; DepthToSpace channels divisible by blocksize^2, SpaceToDepth H and W divisible by blocksize
    (tidl.md §3 Flatten/.../DepthToSpace row). Why: delegated to Arm. Fix: pick shapes divisible by the block.
    """

    id = "TIDL071"
    title = "DepthToSpace/SpaceToDepth shape TIDL does not support"
    ops = frozenset({"DepthToSpace", "SpaceToDepth"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        shape = ctx.static_shape(_input(node, 0))
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


class GridSampleRule(OpConstraintRule):
    """TIDL073: a GridSample TIDL does not take.

    What: mode nearest or bilinear, padding_mode zeros, a 2-D grid (4-D grid tensor) (tidl.md §3 GridSample row).
    Why: delegated to Arm. Fix: ``F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros')`` on 4-D input.
    """

    id = "TIDL073"
    title = "GridSample mode/padding/grid TIDL does not support"
    ops = frozenset({"GridSample"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        mode = str(_decode(ctx.attr(node, "mode", "bilinear" if ctx.opset < 20 else "linear")))
        if mode not in ("nearest", "bilinear", "linear"):
            yield Violation(f"mode {mode!r}: TIDL's GridSample takes nearest or bilinear",
                            "use mode='bilinear' or 'nearest'")
        pad = str(_decode(ctx.attr(node, "padding_mode", "zeros")))
        if pad != "zeros":
            yield Violation(f"padding_mode {pad!r}: TIDL takes 'zeros' only", "use padding_mode='zeros'")
        r = _rank(ctx, _input(node, 1))
        if r is not None and r != 4:
            yield Violation(f"grid of rank {r}; TIDL samples with a 2-D grid (rank 4) only", "sample in 2-D")


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
        reduction = str(_decode(ctx.attr(node, "reduction", "none")))
        bad = reduction == "mul" if node.op_type == "ScatterND" else reduction != "none"
        if bad:
            yield Violation(f"reduction {reduction!r} is unsupported by TIDL's {node.op_type}",
                            "scatter without reduction")
        data = _input(node, 0)
        value = _const_value(ctx, data)
        if value is None or any(v != 0.0 for v in value):
            yield Violation("data is not a zero constant; TIDL scatters into a zero constant only",
                            "scatter into zeros and combine with the tensor afterwards")
        if node.op_type == "ScatterElements":
            axis = int(ctx.attr(node, "axis", 0))
            neg = _neg_axis(axis, _rank(ctx, data))
            if neg is not None and neg != -1:
                yield Violation(f"axis {axis}: TIDL's ScatterElements runs along width (the last axis) only",
                                "scatter along the last axis")


class DeformConvRule(OpConstraintRule):
    """TIDL075: a DeformConv other than 3x3 stride 1.

    What: TIDL takes DeformConv 3x3 stride 1 only (tidl.md §3 DeformConv row). Why: delegated to Arm.
    Fix: use 3x3 stride-1 deformable convolutions.
    """

    id = "TIDL075"
    title = "DeformConv kernel/stride TIDL does not support"
    ops = frozenset({"DeformConv"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        kernel = _kernel(ctx, node)
        strides = [int(s) for s in ctx.attr(node, "strides", [1, 1])]
        if kernel is not None and (kernel != [3, 3] or any(s != 1 for s in strides)):
            yield Violation(f"{_hw(kernel)} kernel at stride {_hw(strides)}: TIDL takes DeformConv 3x3 stride 1 only",
                            "use a 3x3 stride-1 deformable conv")


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
        return op_type in device.spec.ops and op_type not in _NO_LAYER and op_type not in ("Dropout", "Identity")

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        limit = 4 if node.op_type in device.spec.rank4_ops else 6
        tensors = [i for i in node.input if i and not _is_const(ctx, i)] + [o for o in node.output if o]
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
            r = _rank(ctx, node.output[0])
            if r is not None and r > 6:
                yield Violation(f"output has {r} dims; TIDL's Unsqueeze outputs at most 6", "keep tensors at <= 6-D")


OP_CONSTRAINT_RULES: tuple[OpConstraintRule, ...] = (
    ConvRule(),
    PoolRule(),
    ResizeRule(),
    ConcatAxisRule(),
    SoftmaxAxisRule(),
    GemmRule(),
    PadRule(),
    ReshapeRule(),
    SliceSplitRule(),
    ArgMaxRule(),
    ClipRule(),
    CastPlacementRule(),
    ConvTransposeRule(),
    BatchNormRule(),
    EltwiseRule(),
    MatMulRule(),
    LayerNormRule(),
    ReduceMinMaxRule(),
    GatherRule(),
    TopKRule(),
    PReluRule(),
    DepthSpaceRule(),
    RankLimitRule(),
    GridSampleRule(),
    ScatterRule(),
    DeformConvRule(),
)
_UNSUPPORTED = UnsupportedOpRule()


# ---------------------------------------------------------------------------------------------------- support
def _violations_of(ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> list[tuple[str, Violation]]:
    if not device.accelerator:
        return [(_UNSUPPORTED.id, Violation(f"{device.name} has no TIDL accelerator", ""))]
    out: list[tuple[str, Violation]] = []
    v = _UNSUPPORTED.violation(ctx, node, device)
    if v is not None:
        out.append((_UNSUPPORTED.id, v))
    if node.domain in ("", "ai.onnx") and _attributes_match_schema(ctx, node):
        for rule in OP_CONSTRAINT_RULES:
            if rule.takes(node.op_type, device):
                out.extend((rule.id, c) for c in rule.violations(ctx, node, device))
    return out


_ATTR_TYPES = {getattr(onnx.defs.OpSchema.AttrType, n): int(getattr(onnx.AttributeProto, n))
               for n in ("FLOAT", "INT", "STRING", "TENSOR", "GRAPH", "SPARSE_TENSOR", "TYPE_PROTO", "FLOATS", "INTS",
                         "STRINGS", "TENSORS", "GRAPHS", "SPARSE_TENSORS", "TYPE_PROTOS")}


def _attributes_match_schema(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    """False when an attribute has another type than the op's schema gives it (an ``axis`` holding a list or a
    string). The constraint rules read attributes as the schema types them; onnx.checker reports such a node (TIDL001),
    so the constraints skip it instead of failing on it."""
    try:
        schema = onnx.defs.get_schema(node.op_type, max(ctx.opset, 1), "")
    except Exception:
        try:  # an op newer than the model's opset (DeformConv in opset 10): its types are those of today's schema
            schema = onnx.defs.get_schema(node.op_type, "")
        except Exception:  # an op ONNX does not know: nothing to compare with
            return True
    for a in node.attribute:
        spec = schema.attributes.get(a.name)
        if spec is not None and a.type != _ATTR_TYPES.get(spec.type, a.type):
            return False
    return True


def _findings_of(rule: Rule, ctx: ModelContext, device: DeviceProfile, suffix: str) -> Iterator[Finding]:
    """The findings of one op rule, read from the per-device cache that node_support and partition share, so the
    three can never disagree and each constraint is evaluated once per node and device."""
    for node, found in zip(ctx.nodes, _all_violations(ctx, device), strict=True):
        for rule_id, v in found:
            if rule_id == rule.id:
                yield rule.finding(ctx, node, v.message + suffix, v.hint, fixable=v.fixable)


def _all_violations(ctx: ModelContext, device: DeviceProfile) -> list[list[tuple[str, Violation]]]:
    facts = _facts(ctx)
    cached = facts.support.get(device)
    if cached is None:
        cached = [_violations_of(ctx, n, device) for n in ctx.nodes]
        facts.support[device] = cached
    return cached


def node_support(ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> list[str]:
    """Why ``node`` would NOT be offloaded to TIDL on ``device``, as ``"TIDLxxx: reason"`` lines; [] = offloaded.

    Combines the operator table (TIDL040) and every per-operator constraint (TIDL050-TIDL075), exactly what the
    rules report as findings.
    """
    pos = _position(ctx, node)
    found = _all_violations(ctx, device)[pos] if pos is not None else _violations_of(ctx, node, device)
    return [f"{rule_id}: {v.message}" for rule_id, v in found]


@dataclass(frozen=True)
class Partition:
    """How TIDL would split a model on one device: the offloaded subgraphs and the nodes left to Arm.

    ``subgraphs`` are connected components of offloaded nodes, each in graph order, ordered by their first node.
    ``arm`` are the nodes ONNX Runtime runs on Arm, with ``reasons`` (node name -> node_support lines).
    """

    subgraphs: tuple[tuple[onnx.NodeProto, ...], ...]
    arm: tuple[onnx.NodeProto, ...]
    reasons: dict[str, list[str]]


def partition(ctx: ModelContext, device: DeviceProfile) -> Partition:
    """The TIDL partition of ``ctx`` on ``device``: connected components of nodes whose node_support is empty.

    Two offloaded nodes are connected when one reads a tensor the other writes. Components made only of constant
    computations (weight DequantizeLinears, Constants feeding Arm nodes) or only of Q/DQ nodes are not counted as
    subgraphs: they hold no TIDL layer (inference: TIDL folds Q/DQ into the neighbouring layers' parameters).
    """
    support = _all_violations(ctx, device)
    offloaded = [not s for s in support]
    parent = list(range(len(ctx.nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for tensor, p in ctx.producer.items():
        if not offloaded[p]:
            continue
        for c in ctx.consumers.get(tensor, []):
            if offloaded[c]:
                a, b = find(p), find(c)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i, ok in enumerate(offloaded):
        if ok:
            groups.setdefault(find(i), []).append(i)
    const = _facts(ctx).const
    subgraphs = []
    for members in sorted(groups.values(), key=lambda m: m[0]):
        nodes = [ctx.nodes[i] for i in members]
        layer = any(
            n.op_type not in _NO_LAYER and not all(o in const for o in n.output if o)
            for n in nodes
        )
        if layer:
            subgraphs.append(tuple(nodes))
    arm = tuple(n for n, ok in zip(ctx.nodes, offloaded, strict=True) if not ok)
    reasons = {
        ctx.node_name(n): [f"{r}: {v.message}" for r, v in s] for n, s in zip(ctx.nodes, support, strict=True) if s
    }
    return Partition(subgraphs=tuple(subgraphs), arm=arm, reasons=reasons)


# ---------------------------------------------------------------------------------------------------- TIDL041
class SubgraphLimitRule(Rule):
    """TIDL041: the nodes left to Arm split the model into more TIDL subgraphs than TIDL compiles, or one subgraph
    is larger than TIDL's node limit.

    What: the TIDL partition (:func:`partition`: connected components of offloaded nodes) has more than
    ``device.max_num_subgraphs`` (16) components -> error; a component with more than
    ``device.max_num_subgraph_nodes`` (2048 for QDQ models) nodes -> warning.
    Why: compile limits ``max_num_subgraphs`` <= 16 and ``advanced_options:max_num_subgraph_nodes`` default 2048
    for QDQ models (tidl.md §3 "Other compile limits"; edgeai-benchmark sets 2000, tidl.md §5).
    Fix: make the Arm nodes (TIDL040/TIDL05x-07x findings) TIDL-supported so subgraphs merge; raise
    ``advanced_options:max_num_subgraph_nodes`` for a large subgraph.
    """

    id = "TIDL041"
    title = "too many TIDL subgraphs, or a subgraph over the node limit"
    category = "subgraph_limit"
    needs_qdq = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        part = partition(ctx, device)
        n = len(part.subgraphs)
        if n > device.max_num_subgraphs:
            yield self.finding(
                ctx, None,
                f"{len(part.arm)} node(s) left to Arm split the model into {n} TIDL subgraphs; TIDL compiles at most "
                f"{device.max_num_subgraphs} (max_num_subgraphs)",
                "make the Arm nodes TIDL-supported (see the TIDL040 and op_constraint findings) so subgraphs merge",
            )
        for sub in part.subgraphs:
            if len(sub) > device.max_num_subgraph_nodes:
                yield self.finding(
                    ctx, sub[0],
                    f"the TIDL subgraph starting here has {len(sub)} nodes, more than "
                    f"max_num_subgraph_nodes = {device.max_num_subgraph_nodes}",
                    f"set advanced_options:max_num_subgraph_nodes to at least {len(sub)} in the runtime options",
                    severity="warning",
                )
