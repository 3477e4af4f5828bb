"""The ordered list of validator rules. A new rule is added here, in its topic module, and in its test."""

from __future__ import annotations

from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.device_quant import (
    InputQuantizationRule,
    MatMulSignRule,
    PerChannelRule,
    PowerOfTwoRule,
    SymmetricRule,
)
from tiexport.validators.rules.hygiene import BiasRule, RedundantQdqRule, ScaleMismatchRule, UnfoldedWeightRule
from tiexport.validators.rules.ops import OP_CONSTRAINT_RULES, SubgraphLimitRule, UnsupportedOpRule
from tiexport.validators.rules.qdq import (
    BitWidthRule,
    InvalidQParamsRule,
    NotPrequantizedRule,
    QdqAxisRule,
    QdqCoverageRule,
)
from tiexport.validators.rules.structure import (
    CheckerRule,
    GraphIntegrityRule,
    InputShapeRule,
    OpsetRule,
    ShapeInferenceRule,
)

__all__ = ["RULES", "rule_by_id", "rule_titles"]

RULES: tuple[Rule, ...] = (
    CheckerRule(),
    GraphIntegrityRule(),
    OpsetRule(),
    InputShapeRule(),
    ShapeInferenceRule(),
    NotPrequantizedRule(),
    InvalidQParamsRule(),
    BitWidthRule(),
    QdqAxisRule(),
    QdqCoverageRule(),
    PowerOfTwoRule(),
    SymmetricRule(),
    PerChannelRule(),
    InputQuantizationRule(),
    MatMulSignRule(),
    UnfoldedWeightRule(),
    RedundantQdqRule(),
    ScaleMismatchRule(),
    BiasRule(),
    UnsupportedOpRule(),
    *OP_CONSTRAINT_RULES,  # TIDL050-TIDL075: the same instances node_support() and partition() use
    SubgraphLimitRule(),
)


def rule_by_id(rule_id: str) -> Rule:
    for r in RULES:
        if r.id == rule_id:
            return r
    raise KeyError(rule_id)


def rule_titles() -> dict[str, str]:
    return {r.id: r.title for r in RULES}
