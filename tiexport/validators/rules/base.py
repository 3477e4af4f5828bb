"""The Rule base class: a stable id, a title, a category, the devices it applies to, and ``check``.

Adding a rule touches three files: the rule's module in this package, ``tiexport/validators/registry.py`` and its test.
A rule's docstring says what it flags, why and how to fix it; its ``sources`` cite the TI documents (or the ONNX
specification) it rests on, and what no source backs is advice (``advice_parts``): warnings at most.
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
    sources: ClassVar[tuple[str, ...]] = ()
    """Citations of what the rule rests on (``tiexport.tidl_spec.sources``: TI's documents at a release branch, or
    the ONNX specification). A rule without any is tiexport advice: its findings are warnings at most and say so."""
    advice_parts: ClassVar[str] = ""
    """What the rule checks that no source backs (its findings say ``advice``); every check if it has no sources."""
    device_independent: ClassVar[bool] = False
    """``check`` reads nothing of its device but the SDK facts (``device.spec``): validate runs it once per model
    and SDK release and shares the findings between devices."""
    in_subgraphs: ClassVar[bool] = False
    """Also checked inside If branches and Loop/Scan bodies (:func:`tiexport.context.subgraph_contexts`): those
    ops run on Arm, but ONNX Runtime still needs what the rule checks there."""

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
        source: str | None = None,
        advice: bool | None = None,
    ) -> Finding:
        """Build a finding of this rule at ``node`` (None: the model as a whole). ``source``: the citation this
        finding rests on (default: the rule's first); ``advice``: True for a check of this rule that rests on no
        source (default: True only when the rule has none)."""
        if advice is None:
            advice = not self.sources and not source
        return Finding(
            rule_id=self.id,
            category=self.category,
            severity=severity or self.severity,
            node=node_name if node_name is not None else (ctx.node_name(node) if node is not None else ""),
            op_type=op_type if op_type is not None else (node.op_type if node is not None else ""),
            message=message,
            hint=hint,
            fixable=fixable,
            source="" if advice else (source or (self.sources[0] if self.sources else "")),
            advice=advice,
        )
