"""tiexport: take quantized PyTorch models the last mile onto TI devices running TIDL.

The public API is imported lazily so that ``import tiexport`` (and ``tiexport validate``) never imports torch:
the ONNX side (validate, fix, parity between ONNX models, snippets) works on machines without torch, and the torch
side (PTCFxModule, QATFxModule, export) loads torch only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "validate": "tiexport.validators.validate",
    "Report": "tiexport.validators.report",
    "Finding": "tiexport.validators.report",
    "DeviceProfile": "tiexport.devices",
    "get_device": "tiexport.devices",
    "DEVICES": "tiexport.devices",
    "TiexportError": "tiexport.errors",
    "UnusableInputError": "tiexport.errors",
    "UsageError": "tiexport.errors",
    "fix": "tiexport.workflows.fix",
    "FixReport": "tiexport.workflows.fix",
    "check_parity": "tiexport.parity",
    "ParityReport": "tiexport.parity",
    "runtime_options": "tiexport.snippets",
    "snippet": "tiexport.snippets",
    "export": "tiexport.symbolics.export",
    "ExportResult": "tiexport.symbolics.export",
    "ExportError": "tiexport.symbolics.export",
    "PTCFxModule": "tiexport.wrappers.fx",
    "QATFxModule": "tiexport.wrappers.fx",
    "PTQPT2EModule": "tiexport.wrappers.pt2e",
    "QATPT2EModule": "tiexport.wrappers.pt2e",
    "TIDLQuantizer": "tiexport.quantization.pt2e",
    "load_weights": "tiexport.wrappers.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tiexport' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from tiexport.devices import DEVICES, DeviceProfile, get_device  # noqa: F401
    from tiexport.errors import TiexportError, UnusableInputError, UsageError  # noqa: F401
    from tiexport.parity import ParityReport, check_parity  # noqa: F401
    from tiexport.validators.report import Finding, Report  # noqa: F401
    from tiexport.validators.validate import validate  # noqa: F401
