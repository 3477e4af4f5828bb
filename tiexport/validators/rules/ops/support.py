"""Which nodes TIDL offloads on a device: the ordered op rules, the per-device violation table, the partition.

One source of truth (tidl.md §3): the operator table (``device.spec.ops``, :mod:`tiexport.tidl_spec`, checked by
TIDL040) and the constraint rules (TIDL050-TIDL075, in :data:`OP_CONSTRAINT_RULES` order) give each node's
violations once per device; :func:`node_support` reads them, the rules' findings are read from the same table
(bound into :func:`~tiexport.validators.rules.ops.base.findings_of` here), and :func:`partition` groups the offloaded
nodes into TIDL subgraphs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.ops.arithmetic import (
    BatchNormRule,
    ClipRule,
    EltwiseRule,
    GemmRule,
    LayerNormRule,
    MatMulRule,
    PReluRule,
    SoftmaxAxisRule,
)
from tiexport.validators.rules.ops.base import OpConstraintRule, bind_findings
from tiexport.validators.rules.ops.conv import ConvRule, ConvTransposeRule, DeformConvRule
from tiexport.validators.rules.ops.facts import NO_LAYER, Violation, model_facts, position
from tiexport.validators.rules.ops.pooling import ArgMaxRule, PoolRule, ReduceMinMaxRule, TopKRule
from tiexport.validators.rules.ops.resize import GridSampleRule, ResizeRule
from tiexport.validators.rules.ops.shape import (
    CastPlacementRule,
    ConcatAxisRule,
    DepthSpaceRule,
    GatherRule,
    PadRule,
    RankLimitRule,
    ReshapeRule,
    ScatterRule,
    SliceSplitRule,
)
from tiexport.validators.rules.ops.unsupported import UnsupportedOpRule

__all__ = ["OP_CONSTRAINT_RULES", "Partition", "node_support", "partition"]

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


def _violations_of(ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile,
                   rules_of: dict[str, list[OpConstraintRule]] | None = None) -> list[tuple[str, Violation]]:
    """Why ``node`` is not offloaded on ``device``. ``rules_of``: op type -> the constraint rules that take it on
    this device, shared by the nodes of one model (built on demand)."""
    if not device.accelerator:
        return [(_UNSUPPORTED.id, Violation(f"{device.name} has no TIDL accelerator", ""))]
    out: list[tuple[str, Violation]] = []
    v = _UNSUPPORTED.violation(ctx, node, device)
    if v is not None:
        out.append((_UNSUPPORTED.id, v))
    if node.domain in ("", "ai.onnx") and _attributes_match_schema(ctx, node):
        if rules_of is None:
            rules_of = {}
        rules = rules_of.get(node.op_type)
        if rules is None:
            rules = rules_of[node.op_type] = [r for r in OP_CONSTRAINT_RULES if r.takes(node.op_type, device)]
        for rule in rules:
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
                yield rule.finding(ctx, node, v.message + suffix, v.hint, fixable=v.fixable,
                                   source=device.spec.op_source(node.op_type))


def _all_violations(ctx: ModelContext, device: DeviceProfile) -> list[list[tuple[str, Violation]]]:
    facts = model_facts(ctx)
    cached = facts.support.get(device)
    if cached is None:
        rules_of: dict[str, list[OpConstraintRule]] = {}
        cached = [_violations_of(ctx, n, device, rules_of) for n in ctx.nodes]
        facts.support[device] = cached
    return cached


bind_findings(_findings_of)


def node_support(ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> list[str]:
    """Why ``node`` would NOT be offloaded to TIDL on ``device``, as ``"TIDLxxx: reason"`` lines; [] = offloaded.

    Combines the operator table (TIDL040) and every per-operator constraint (TIDL050-TIDL075), exactly what the
    rules report as findings.
    """
    pos = position(ctx, node)
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
    const = model_facts(ctx).const
    subgraphs = []
    for members in sorted(groups.values(), key=lambda m: m[0]):
        nodes = [ctx.nodes[i] for i in members]
        layer = any(
            n.op_type not in NO_LAYER and not all(o in const for o in n.output if o)
            for n in nodes
        )
        if layer:
            subgraphs.append(tuple(nodes))
    arm = tuple(n for n, ok in zip(ctx.nodes, offloaded, strict=True) if not ok)
    reasons = {
        ctx.node_name(n): [f"{r}: {v.message}" for r, v in s] for n, s in zip(ctx.nodes, support, strict=True) if s
    }
    return Partition(subgraphs=tuple(subgraphs), arm=arm, reasons=reasons)
