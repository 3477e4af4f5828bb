"""Validators: TIDL prequantized-model compatibility rules, reports and (ONNX/torch) numeric parity."""

from __future__ import annotations

from tiexport.validators.report import Finding, Report
from tiexport.validators.validate import validate

__all__ = ["Finding", "Report", "validate"]
