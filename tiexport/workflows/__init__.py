"""Orchestration above the layers: the end-to-end jobs users run, built from passes, validators and parity.

- :mod:`~tiexport.workflows.fix`: :func:`fix` (pass pipeline -> load check -> parity -> write -> re-validate);
- :mod:`~tiexport.workflows.export`: :func:`export_checked` (torch export -> fix -> parity against the torch module
  -> validate), what the PTC/QAT wrappers' ``export()`` runs.

Import the submodule you need: this package imports nothing itself, and no module here imports torch at module
level (a torch module given to :func:`export_checked` is passed on to the exporter and to parity).
"""

from __future__ import annotations

__all__: list[str] = []
