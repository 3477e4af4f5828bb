"""Validators: TIDL prequantized-model compatibility rules (``rules/``, ``registry``, ``validate``), reports
(``report``) and numeric parity (``parity``, ``torch_parity``).

Import the submodule you need (or use ``tiexport.validate`` / ``tiexport.check_parity``): this package imports
nothing itself, so that ``tiexport parity`` does not load every rule and ``tiexport validate`` does not load
ONNX Runtime.
"""

from __future__ import annotations

__all__: list[str] = []
