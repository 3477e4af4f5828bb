"""A snippet refusal points at `tiexport fix` only when fix can remove every error it names."""

from __future__ import annotations

from tiexport.snippets import IncompatibleModelError
from tiexport.validators.report import DeviceReport, Finding, Report


def _error(rule_id: str, fixable: bool) -> Finding:
    return Finding(rule_id, "qdq_coverage", "error", "n", "MatMul", "float input", "quantize it", fixable=fixable)


def _refusal(*findings: Finding) -> str:
    report = Report(model="m.onnx", devices={"AM68A": DeviceReport("AM68A", list(findings))})
    return str(IncompatibleModelError("m.onnx", "AM68A", list(findings), report))


def test_fixable_errors_point_at_fix() -> None:
    assert "Run `tiexport fix --device AM68A`" in _refusal(_error("TIDL021", True))


def test_an_error_fix_cannot_change_names_the_rule_and_points_at_re_export() -> None:
    text = _refusal(_error("TIDL021", True), _error("TIDL014", False))
    assert "tiexport fix --device" not in text
    assert "TIDL014 is not fixable by `tiexport fix`: re-export or re-quantize the model" in text
