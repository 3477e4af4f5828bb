"""The torch side: TI's qconfig types, observers, bias calibration, the PTC/QAT wrappers, and export.

Submodules import torch; this package itself imports nothing, so ``import tiexport`` stays torch-free.
"""

from __future__ import annotations

__all__: list[str] = []
