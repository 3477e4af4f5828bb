"""Operator rules: which nodes TIDL offloads, the per-operator constraints that decide it, and the TIDL partition.

One source of truth (tidl.md §3): the operator table (``device.spec.ops``, :mod:`tiexport.tidl_spec`) and the
constraint rules feed :func:`node_support`, which says why a node would *not* be offloaded (an empty list: TIDL takes
it). The rules report the same reasons as findings, and :func:`partition` groups the offloaded nodes into TIDL
subgraphs.

A node TIDL cannot take is not an import failure: TIDL's ONNX Runtime delegate leaves it to ONNX Runtime on the Arm
cores and splits the graph around it (tidl.md §3 "Anything else runs on the Arm cores ... a subgraph split, not an
error"), so op findings are warnings. The exception is the compile limit ``max_num_subgraphs`` <= 16 (tidl.md §3
"Other compile limits"), an error.

Shapes come from the shared :class:`~tiexport.context.ModelContext`; when a shape or a parameter a rule
needs is unknown (not inferable, or computed at run time), the rule says nothing rather than guess. Modules, by
concern:

- :mod:`~tiexport.validators.rules.ops.facts`: :class:`Violation`, the per-model facts (constant-derived tensors,
  the fused GELU and LayerNorm patterns) and the helpers the rules share;
- :mod:`~tiexport.validators.rules.ops.base`: :class:`OpConstraintRule` and how op rules reach their findings;
- :mod:`~tiexport.validators.rules.ops.unsupported`: TIDL040, operators outside TIDL's table;
- :mod:`~tiexport.validators.rules.ops.conv`, :mod:`~tiexport.validators.rules.ops.pooling`,
  :mod:`~tiexport.validators.rules.ops.resize`, :mod:`~tiexport.validators.rules.ops.shape`,
  :mod:`~tiexport.validators.rules.ops.arithmetic`: the constraint rules TIDL050-TIDL075, by layer family;
- :mod:`~tiexport.validators.rules.ops.support`: :data:`OP_CONSTRAINT_RULES`, the per-device violation table,
  :func:`node_support` and :func:`partition`;
- :mod:`~tiexport.validators.rules.ops.subgraphs`: TIDL041, the partition against TIDL's compile limits.
"""

from __future__ import annotations

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
from tiexport.validators.rules.ops.base import OpConstraintRule
from tiexport.validators.rules.ops.conv import ConvRule, ConvTransposeRule, DeformConvRule
from tiexport.validators.rules.ops.facts import Violation
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
from tiexport.validators.rules.ops.subgraphs import SubgraphLimitRule
from tiexport.validators.rules.ops.support import OP_CONSTRAINT_RULES, Partition, node_support, partition
from tiexport.validators.rules.ops.unsupported import UnsupportedOpRule

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
