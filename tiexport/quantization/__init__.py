"""The torch side: TI's qconfig types, observers, bias calibration, the PTC/QAT wrappers, and export.

Submodules import torch; this package itself imports nothing, so ``import tiexport`` stays torch-free. The public
names below load their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ExportError", "ExportResult", "PTCFxModule", "QATFxModule", "export", "load_weights"]

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "export": "tiexport.symbolics.export",
    "ExportResult": "tiexport.symbolics.export",
    "ExportError": "tiexport.symbolics.export",
    "PTCFxModule": "tiexport.quantization.wrapper",
    "QATFxModule": "tiexport.quantization.wrapper",
    "load_weights": "tiexport.quantization.wrapper",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tiexport.quantization' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
