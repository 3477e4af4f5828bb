"""Findings and reports: data first, rendered as text, JSON (stable schema) or SARIF 2.1.0.

A :class:`Finding` is one broken rule at one node for one device. A :class:`Report` holds, per device, the findings
and a verdict. Renderers never decide anything; the CLI exit code follows :meth:`Report.exit_code`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tiexport.terminal import paint

__all__ = [
    "CATEGORIES",
    "SEVERITIES",
    "DeviceReport",
    "Finding",
    "Report",
    "render",
    "render_many",
]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
_RANK = {"error": 3, "warning": 2, "info": 1, "never": 99}

CATEGORIES: tuple[str, ...] = (
    "structure",
    "opset",
    "static_shape",
    "not_prequantized",
    "invalid_qparams",
    "bit_width",
    "qdq_axis",
    "qdq_coverage",
    "power_of_two",
    "symmetric",
    "per_channel",
    "input_quantization",
    "matmul_sign",
    "unsupported_op",
    "op_constraint",
    "unfolded_weight",
    "redundant_qdq",
    "scale_mismatch",
    "bias",
    "subgraph_limit",
)


@dataclass(frozen=True, order=True)
class Finding:
    """One rule broken at one node. ``node`` is the node name ("" for model-level findings).

    ``source`` cites what the finding rests on (TI's documents at a release branch, or the ONNX specification);
    ``advice`` marks a finding that rests on no such source, only on tiexport's reading: it is a warning at most.
    """

    rule_id: str
    category: str
    severity: str
    node: str
    op_type: str
    message: str
    hint: str
    fixable: bool = False
    source: str = ""
    advice: bool = False

    def __post_init__(self) -> None:
        # protobuf hands back bytes for names that are not valid UTF-8; findings are always text
        for name in ("node", "op_type", "message", "hint"):
            value = getattr(self, name)
            if isinstance(value, bytes):
                object.__setattr__(self, name, value.decode("utf-8", "backslashreplace"))
        if self.severity not in SEVERITIES:
            raise ValueError(f"bad severity {self.severity!r}")
        if self.category not in CATEGORIES:
            raise ValueError(f"bad category {self.category!r}")
        if self.advice and self.severity == "error":
            raise ValueError(f"{self.rule_id}: advice (no source) cannot be an error")
        if self.advice and self.source:
            raise ValueError(f"{self.rule_id}: a finding with a source is not advice")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sort_key(f: Finding) -> tuple[int, str, str, str]:
    return (-_RANK[f.severity], f.rule_id, f.node, f.message)


@dataclass
class DeviceReport:
    """Findings of one device, sorted by severity then rule then node."""

    device: str
    findings: list[Finding] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.findings = sorted(dict.fromkeys(self.findings), key=_sort_key)

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def verdict(self) -> str:
        if self.count("error"):
            return "incompatible"
        if self.count("warning"):
            return "compatible_with_warnings"
        return "compatible"

    def worst(self) -> str | None:
        return max((f.severity for f in self.findings), key=_RANK.__getitem__, default=None)


@dataclass
class Report:
    """The result of validating one model for one or more devices."""

    model: str
    devices: dict[str, DeviceReport]
    tiexport_version: str = ""
    sdk: str = ""
    """The TIDL SDK release the rules checked against (``tiexport.tidl_spec``)."""

    def __post_init__(self) -> None:
        if not self.tiexport_version:
            from tiexport import __version__

            self.tiexport_version = __version__
        if not self.sdk:
            from tiexport.tidl_spec import DEFAULT_SDK

            self.sdk = DEFAULT_SDK

    @property
    def findings(self) -> list[Finding]:
        """All findings of all devices (a finding shared by devices appears once per device)."""
        return [f for d in self.devices.values() for f in d.findings]

    def exit_code(self, fail_on: str = "error") -> int:
        """0 when no finding at or above ``fail_on`` for any device, else 1."""
        if fail_on not in _RANK:
            raise ValueError(f"fail_on must be error, warning or never, not {fail_on!r}")
        threshold = _RANK[fail_on]
        return int(any(_RANK[f.severity] >= threshold for f in self.findings))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tiexport_version": self.tiexport_version,
            "tidl_sdk": self.sdk,
            "devices": {
                name: {"verdict": d.verdict, "findings": [f.to_dict() for f in d.findings]}
                for name, d in self.devices.items()
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_sarif(self, rule_titles: dict[str, str] | None = None) -> str:
        return json.dumps(_sarif(self, rule_titles or {}), indent=2) + "\n"

    def to_text(self, colour: bool = False, rule_titles: dict[str, str] | None = None,
                max_nodes: int | None = None) -> str:
        """Grouped text; ``max_nodes``: list at most that many nodes per rule and device (None: all)."""
        return _text(self, colour, rule_titles, max_nodes)

    def summary_lines(self, colour: bool = False) -> list[str]:
        """One line per device: verdict and counts."""
        return [_summary_line(self, name, dev, colour) for name, dev in self.devices.items()]


# ---------------------------------------------------------------------------------------------------------- text
def _summary_line(report: Report, name: str, dev: DeviceReport, colour: bool) -> str:
    counts = ", ".join(f"{dev.count(s)} {s}{'s' if dev.count(s) != 1 else ''}" for s in SEVERITIES)
    key = {"incompatible": "error", "compatible_with_warnings": "warning", "compatible": "ok"}[dev.verdict]
    head = f"{paint(name, 'bold', colour)} (TIDL {report.sdk}): {paint(dev.verdict, key, colour)}"
    return f"{head} ({counts})  [{report.model}]"


def _text(report: Report, colour: bool, titles: dict[str, str] | None = None, max_nodes: int | None = None) -> str:
    """Per device: a summary line, then findings grouped by severity and rule, each rule's hint printed once;
    with ``max_nodes``, at most that many nodes per rule and a count of the rest."""
    titles = titles or {}
    lines: list[str] = []
    for name, dev in report.devices.items():
        lines.append(_summary_line(report, name, dev, colour))
        for severity in SEVERITIES:
            by_rule: dict[str, list[Finding]] = {}
            for f in dev.findings:
                if f.severity == severity:
                    by_rule.setdefault(f.rule_id, []).append(f)
            for rule_id, group in by_rule.items():
                first = group[0]
                fixable = " [fixable: tiexport fix]" if all(f.fixable for f in group) else ""
                advice = " [tiexport advice: no TI source]" if all(f.advice for f in group) else ""
                title = titles.get(rule_id, first.category)
                n = f" ({len(group)} nodes)" if len(group) > 1 else ""
                lines.append(f"  {paint(severity, severity, colour)} {rule_id} {first.category}: {title}{n}{fixable}"
                             f"{advice}")
                hints = {f.hint for f in group}
                shared_hint = first.hint if len(hints) == 1 else ""
                if shared_hint:
                    lines.append(f"    fix: {shared_hint}")
                sources = {f.source for f in group if f.source}
                shared_source = next(iter(sources)) if len(sources) == 1 and all(f.source for f in group) else ""
                if shared_source:
                    lines.append(f"    source: {shared_source}")
                shown = group if max_nodes is None or len(group) <= max_nodes + 1 else group[:max_nodes]
                for f in shown:
                    where = f"{f.node} ({f.op_type})" if f.node else (f.op_type or "model")
                    lines.append(f"    - {where}: {f.message}")
                    if f.hint and not shared_hint:
                        lines.append(f"      fix: {f.hint}")
                    if f.source and not shared_source:
                        lines.append(f"      source: {f.source}")
                    if f.advice and not advice:
                        lines.append("      (tiexport advice: no TI source)")
                if len(shown) < len(group):
                    lines.append(f"    ... and {len(group) - len(shown)} more (--verbose lists all)")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- SARIF
_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def _sarif(report: Report, titles: dict[str, str]) -> dict[str, Any]:
    rule_ids = sorted({f.rule_id for f in report.findings})
    rules = [
        {
            "id": rid,
            "name": rid,
            "shortDescription": {"text": titles.get(rid, rid)},
            "properties": {
                "category": next(f.category for f in report.findings if f.rule_id == rid),
            },
        }
        for rid in rule_ids
    ]
    results = []
    for dev_name, dev in report.devices.items():
        for f in dev.findings:
            results.append(
                {
                    "ruleId": f.rule_id,
                    "ruleIndex": rule_ids.index(f.rule_id),
                    "level": _SARIF_LEVEL[f.severity],
                    "message": {"text": f"[{dev_name}] {f.message}" + (f" Hint: {f.hint}" if f.hint else "")},
                    "locations": [
                        {
                            "physicalLocation": {"artifactLocation": {"uri": report.model}},
                            "logicalLocations": [
                                {"name": f.node or "<model>", "kind": "object",
                                 "fullyQualifiedName": f"{f.op_type}:{f.node}" if f.node else "<model>"}
                            ],
                        }
                    ],
                    "properties": {
                        "device": dev_name,
                        "category": f.category,
                        "op_type": f.op_type,
                        "hint": f.hint,
                        "fixable": f.fixable,
                        "source": f.source,
                        "advice": f.advice,
                    },
                }
            )
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "tiexport",
                        "version": report.tiexport_version,
                        "properties": {"tidl_sdk": report.sdk},
                        "rules": rules,
                    }
                },
                "results": results,
            }
        ],
    }


def render(report: Report, fmt: str, colour: bool = False, rule_titles: dict[str, str] | None = None,
           max_nodes: int | None = None) -> str:
    """Render a report as ``text`` (at most ``max_nodes`` nodes per rule and device; None: all), ``json`` or
    ``sarif``."""
    if fmt == "text":
        return report.to_text(colour, rule_titles, max_nodes)
    if fmt == "json":
        return report.to_json()
    if fmt == "sarif":
        return report.to_sarif(rule_titles)
    raise ValueError(f"unknown format {fmt!r}")


def render_many(reports: Sequence[Report], fmt: str, colour: bool = False,
                rule_titles: dict[str, str] | None = None, failed: Mapping[str, str] | None = None) -> str:
    """Several models in one output: ``text`` one summary line per model and device (and per model that could
    not be read, from ``failed``: path -> reason); ``json`` ``{"models": [report, ...], "unreadable": {...}}``;
    ``sarif`` one run whose results cover every model (each result's location names its model)."""
    failed = dict(failed or {})
    if fmt == "text":
        lines = [line for r in reports for line in r.summary_lines(colour)]
        lines += [f"{paint('unusable', 'error', colour)}: {reason}  [{path}]" for path, reason in failed.items()]
        return "\n".join(lines) + "\n"
    if fmt == "json":
        return json.dumps({"models": [r.to_dict() for r in reports], "unreadable": failed}, indent=2) + "\n"
    if fmt == "sarif":
        titles = rule_titles or {}
        runs = [_sarif(r, titles)["runs"][0] for r in reports]
        rule_ids = sorted({rule["id"] for run in runs for rule in run["tool"]["driver"]["rules"]})
        rules = {rule["id"]: rule for run in runs for rule in run["tool"]["driver"]["rules"]}
        results = []
        for run in runs:
            for result in run["results"]:
                result["ruleIndex"] = rule_ids.index(result["ruleId"])
                results.append(result)
        for path, reason in failed.items():
            results.append({"ruleId": "unusable", "level": "error", "message": {"text": reason},
                            "locations": [{"physicalLocation": {"artifactLocation": {"uri": path}}}]})
        merged = _sarif(reports[0], titles) if reports else _sarif(Report(model="", devices={}), titles)
        merged["runs"][0]["tool"]["driver"]["rules"] = [rules[rid] for rid in rule_ids]
        merged["runs"][0]["results"] = results
        return json.dumps(merged, indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def merge(findings: Iterable[Finding]) -> list[Finding]:
    """Sorted, de-duplicated findings."""
    return sorted(dict.fromkeys(findings), key=_sort_key)
