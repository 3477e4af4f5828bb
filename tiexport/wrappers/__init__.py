"""The PTC/QAT wrappers users train with: TI's API names and training loop over tiexport's quantization.

- :mod:`~tiexport.wrappers.base`: :class:`QuantOptions` and :class:`QuantWrapper`, what every wrapper shares (the
  epoch state machine, DDP sync, forward, ``export()`` through :mod:`tiexport.workflows.export`);
- :mod:`~tiexport.wrappers.fx`: :class:`PTCFxModule` and :class:`QATFxModule` (torch.fx, TI's v2 names);
- :mod:`~tiexport.wrappers.checkpoint`: :func:`load_weights`.

The wrappers sit above the quantization building blocks (:mod:`tiexport.quantization`), the exporter
(:mod:`tiexport.symbolics`) and the orchestration (:mod:`tiexport.workflows`). Importing this package imports torch;
``import tiexport`` does not (``tiexport.PTCFxModule`` loads it on first use).
"""

from __future__ import annotations

from tiexport.workflows.export import QuantExportResult
from tiexport.wrappers.base import QuantOptions, QuantWrapper
from tiexport.wrappers.checkpoint import LoadReport, load_weights
from tiexport.wrappers.fx import PTCFxModule, QATFxModule

__all__ = [
    "LoadReport",
    "PTCFxModule",
    "QATFxModule",
    "QuantExportResult",
    "QuantOptions",
    "QuantWrapper",
    "load_weights",
]
