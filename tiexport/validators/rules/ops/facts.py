"""What the op rules know about a model, and the small helpers they share.

- :class:`Violation`: one reason a node is not offloaded to TIDL;
- the per-model facts, computed once per :class:`~tiexport.context.ModelContext` (not per device): each node's
  position, the constant-derived tensors, the nodes of the patterns TIDL fuses (GELU around an Erf, decomposed
  LayerNorm around its ReduceMeans: tidl.md §3 "Erf inside GELU, ReduceMean inside LayerNorm are fused"), and the
  per-device violation table that :mod:`~tiexport.validators.rules.ops.support` fills;
- helpers reading constants, shapes, axes and attributes. When a shape or a parameter is unknown (not inferable, or
  computed at run time) they return None and the rules say nothing rather than guess.

These names are the package's internal API: the rule modules import them, the package ``__init__`` does not
re-export them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile

__all__ = [
    "ARM",
    "NO_LAYER",
    "Violation",
    "attr_or_input_ints",
    "const_ints",
    "const_value",
    "decode",
    "down",
    "hw",
    "in_fused_pattern",
    "is_const_derived",
    "model_facts",
    "neg_axis",
    "node_input",
    "position",
    "rank_of",
    "shape_of",
    "up",
]

ARM = "; runs on Arm (ONNX Runtime)"
# Ops that never become TIDL layers of their own and are not counted as rank-limited layers.
NO_LAYER = frozenset({"QuantizeLinear", "DequantizeLinear", "Constant", "Cast"})

# The package's name, as when all op rules were one module: one facts object per model for the whole package.
_CACHE_KEY = "tiexport.validators.rules.ops"


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


def model_facts(ctx: ModelContext) -> _Facts:
    # Cached on the context itself, not in a module-level table: validate is called from several threads at once.
    facts: _Facts | None = ctx.cache.get(_CACHE_KEY)
    if facts is None:
        facts = _Facts(index={id(n): i for i, n in enumerate(ctx.nodes)}, const=_const_tensors(ctx), fused=frozenset())
        ctx.cache[_CACHE_KEY] = facts
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


def position(ctx: ModelContext, node: onnx.NodeProto) -> int | None:
    pos = model_facts(ctx).index.get(id(node))
    if pos is not None:
        return pos
    # A node object from outside ctx.nodes (another protobuf wrapper of the same node): find it by its outputs.
    out = next((o for o in node.output if o), None)
    return ctx.producer.get(out) if out else None


def is_const_derived(ctx: ModelContext, tensor: str) -> bool:
    return tensor in model_facts(ctx).const


def in_fused_pattern(ctx: ModelContext, node: onnx.NodeProto) -> bool:
    pos = position(ctx, node)
    return pos is not None and pos in model_facts(ctx).fused


# Pattern matching looks through Q -> DQ pairs: exporters put them inside GELU/LayerNorm as often as not.
def _source(ctx: ModelContext, tensor: str) -> str:
    """The float tensor behind ``tensor``: x for DQ(Q(x)), else the tensor itself."""
    dq = ctx.producer_of(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input:
        q = ctx.producer_of(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input:
            return q.input[0]
    return tensor


def up(ctx: ModelContext, tensor: str) -> onnx.NodeProto | None:
    return ctx.producer_of(_source(ctx, tensor))


def down(ctx: ModelContext, tensor: str) -> list[onnx.NodeProto]:
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
    if is_const_derived(ctx, b) and not is_const_derived(ctx, a):
        return a, b
    if is_const_derived(ctx, a) and not is_const_derived(ctx, b):
        return b, a
    return None


def _gelu_erfs(ctx: ModelContext) -> set[int]:
    """Erf nodes inside x * 0.5 * (1 + erf(x / sqrt(2))) (any order of the two Muls): TIDL fuses them into GELU."""
    found: set[int] = set()
    for pos, erf in enumerate(ctx.nodes):
        if erf.op_type != "Erf" or not erf.input or not erf.output:
            continue
        scale = up(ctx, erf.input[0])
        pair = _const_operand(ctx, scale) if scale is not None and scale.op_type in ("Div", "Mul") else None
        if pair is None:
            continue
        x = _source(ctx, pair[0])
        for add in down(ctx, erf.output[0]):
            if add.op_type != "Add" or _const_operand(ctx, add) is None:
                continue
            muls = [m for m in down(ctx, add.output[0]) if m.op_type == "Mul"]
            muls += [m2 for m in muls for m2 in down(ctx, m.output[0]) if m2.op_type == "Mul"]
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
    pos_of = model_facts(ctx).index
    for sub in ctx.nodes:
        if sub.op_type != "Sub" or len(sub.input) != 2 or not sub.output:
            continue
        x, m = sub.input
        mean = up(ctx, m)
        if mean is None or mean.op_type != "ReduceMean" or not mean.input:
            continue
        if _source(ctx, mean.input[0]) != _source(ctx, x):
            continue
        d = sub.output[0]
        for sq in down(ctx, d):
            squared = (sq.op_type == "Mul" and all(_source(ctx, i) == d for i in sq.input)) or (
                sq.op_type == "Pow" and len(sq.input) == 2 and const_value(ctx, sq.input[1]) == [2.0])
            if not squared or not sq.output:
                continue
            for var in down(ctx, sq.output[0]):
                if var.op_type == "ReduceMean":
                    found.update(pos_of[id(n)] for n in (mean, sub, var))
    return found


# ---------------------------------------------------------------------------------------------------- small helpers
def const_value(ctx: ModelContext, tensor: str) -> list[float] | None:
    """A small constant as a flat list (only real constants: initializers and Constant outputs)."""
    if not tensor or not ctx.is_const(tensor):
        return None
    v = ctx.const(tensor)
    if v is None or v.size > 4096:
        return None
    return [float(x) for x in np.asarray(v).ravel()]


def const_ints(ctx: ModelContext, tensor: str) -> list[int] | None:
    v = const_value(ctx, tensor)
    return None if v is None else [int(x) for x in v]


def node_input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def shape_of(ctx: ModelContext, tensor: str) -> tuple[int, ...] | None:
    """Static shape of a tensor, from inference or (for constants) the initializer."""
    s = ctx.static_shape(tensor)
    if s is None and ctx.is_const(tensor):
        s = ctx.const_shape(tensor)
    return s


def rank_of(ctx: ModelContext, tensor: str) -> int | None:
    return ctx.rank(tensor) if tensor else None


def neg_axis(axis: int, rank: int | None) -> int | None:
    """The axis counted from the end (-1 = last), or None when it cannot be known."""
    if axis < 0:
        return axis
    return None if rank is None else axis - rank


def hw(values: Sequence[int]) -> str:
    return "x".join(str(v) for v in values)


def attr_or_input_ints(ctx: ModelContext, node: onnx.NodeProto, attr: str, index: int) -> list[int] | None:
    """A list parameter that moved from an attribute to an input across opsets (axes, split, pads...)."""
    value = ctx.attr(node, attr)
    if value is not None:
        return [int(v) for v in value]
    tensor = node_input(node, index)
    return const_ints(ctx, tensor) if tensor else None


def decode(v: object) -> object:
    # "replace": a STRING attribute need not be valid UTF-8, and such a mode is simply not one TIDL knows
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
