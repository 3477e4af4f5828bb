"""The base of the per-operator constraint rules (TIDL050-TIDL075), and how op rules reach their findings.

Every op rule (TIDL040 and the constraint rules) reads its findings from one per-device table of violations, so
the rules, :func:`~tiexport.validators.rules.ops.support.node_support` and
:func:`~tiexport.validators.rules.ops.support.partition` never disagree. That table is built from the ordered rule
tuple in :mod:`~tiexport.validators.rules.ops.support`, which imports the rule modules; the rules therefore reach it
through :func:`findings_of`, which :mod:`~tiexport.validators.rules.ops.support` binds when it is imported (by the
package ``__init__``, before any rule can run), and no module imports its importer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import get_spec
from tiexport.tidl_spec.sources import OPS_DOC, TOOLS_REPO, DocRef
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.ops.facts import ARM, Violation

__all__ = ["FindingsReader", "OpConstraintRule", "bind_findings", "findings_of"]

FindingsReader = Callable[[Rule, ModelContext, DeviceProfile, str], Iterator[Finding]]
"""(rule, ctx, device, message suffix) -> the rule's findings, read from the per-device violation table."""

_reader: FindingsReader | None = None


def bind_findings(reader: FindingsReader) -> None:
    """Install the reader of the violation table; called once, by :mod:`~tiexport.validators.rules.ops.support`."""
    global _reader
    _reader = reader


def findings_of(rule: Rule, ctx: ModelContext, device: DeviceProfile, suffix: str) -> Iterator[Finding]:
    """The findings of one op rule, ``suffix`` appended to each message."""
    if _reader is None:  # the package __init__ imports support, so only a broken package gets here
        raise RuntimeError("tiexport.validators.rules.ops.support has not bound the violation table")
    return _reader(rule, ctx, device, suffix)


class OpConstraintRule(Rule):
    """Base of the per-operator constraint rules: ``violations`` for nodes whose op is in ``ops``.

    Constraint findings are warnings: a node TIDL cannot take is delegated to Arm (tidl.md §3 first line).
    """

    category = "op_constraint"
    severity = "warning"
    needs_qdq = False
    ops: ClassVar[frozenset[str]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # the rows of the default release's operator table this rule checks; findings cite their own release's row
        if "sources" not in cls.__dict__:
            spec = get_spec()
            rows = [spec.op_source(op) for op in sorted(cls.__dict__.get("ops", ())) if op in spec.op_lines]
            cls.sources = tuple(dict.fromkeys(rows)) or (DocRef(TOOLS_REPO, spec.branch, OPS_DOC).cite(),)

    def takes(self, op_type: str, device: DeviceProfile) -> bool:
        """Whether this rule constrains nodes of ``op_type`` on ``device``."""
        return op_type in self.ops

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        raise NotImplementedError

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        yield from findings_of(self, ctx, device, ARM)
