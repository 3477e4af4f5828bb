"""The name of tiexport's export-time torch op, shared by its definition (:mod:`tiexport.symbolics.ops`, which
imports torch) and its exporter translations (:mod:`tiexport.symbolics.qdq`, which does not)."""

from __future__ import annotations

__all__ = ["OP_NAME", "OP_NAMESPACE"]

OP_NAMESPACE = "tiexport"
OP_NAME = "quantize_dequantize"
