"""The torch side's building blocks: TI's qconfig types and graph rules, observers and fake-quants, bias
calibration, cross-layer equalization, Conv+BN folding and the quantization-friendly attention swap.

The wrappers users train with are in :mod:`tiexport.wrappers` (``tiexport.PTCFxModule``, ``tiexport.QATFxModule``),
the exporter in :mod:`tiexport.symbolics` (``tiexport.export``). Submodules import torch; this package itself
imports nothing, so ``import tiexport`` stays torch-free.
"""

from __future__ import annotations

__all__: list[str] = []
