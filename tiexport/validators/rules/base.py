"""The Rule base class: a stable id, a title, a category, the devices it applies to, and ``check``.

Adding a rule touches three files: the rule's module in this package, ``tiexport/validators/registry.py`` and its test.
A rule's docstring says what it flags, why (citing ``shared/reference/tidl.md`` or a public TI doc) and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.report import Finding

__all__ = ["Rule"]


class Rule:
    """Base class of all validator rules. Subclasses are stateless; ``check`` yields findings."""

    id: ClassVar[str]
    title: ClassVar[str]
    category: ClassVar[str]
    severity: ClassVar[str] = "error"
    needs_qdq: ClassVar[bool] = True
    """Skipped on float models (those get one ``not_prequantized`` finding instead)."""
    needs_accelerator: ClassVar[bool] = True
    """Skipped on devices without a TIDL accelerator (AM62), where everything runs in ONNX Runtime on Arm."""
    device_independent: ClassVar[bool] = False
    """``check`` reads nothing of its device but the SDK facts (``device.spec``): validate runs it once per model
    and SDK release and shares the findings between devices."""

    def applies_to(self, device: DeviceProfile) -> bool:
        return device.accelerator or not self.needs_accelerator

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterable[Finding]:
        raise NotImplementedError

    def finding(
        self,
        ctx: ModelContext,
        node: onnx.NodeProto | None,
        message: str,
        hint: str = "",
        *,
        severity: str | None = None,
        fixable: bool = False,
        op_type: str | None = None,
        node_name: str | None = None,
    ) -> Finding:
        """Build a finding of this rule at ``node`` (None: the model as a whole)."""
        return Finding(
            rule_id=self.id,
            category=self.category,
            severity=severity or self.severity,
            node=node_name if node_name is not None else (ctx.node_name(node) if node is not None else ""),
            op_type=op_type if op_type is not None else (node.op_type if node is not None else ""),
            message=message,
            hint=hint,
            fixable=fixable,
        )
