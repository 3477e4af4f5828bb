"""Validators: TIDL prequantized-model compatibility rules, static (no model is run).

- ``rules/``: the rules by topic (``structure``, ``qdq``, ``device_quant``, ``hygiene``, and ``ops/``, the
  operator rules with the TIDL partitioner), on the shared :class:`~tiexport.context.ModelContext`;
- ``registry``: the ordered rule list; ``validate``: :func:`validate`; ``report``: findings and their renderers.

Import the submodule you need (or use ``tiexport.validate``): this package imports nothing itself, so that importing
one rule module does not load every rule. Numeric parity, which runs models, is :mod:`tiexport.parity`.
"""

from __future__ import annotations

__all__: list[str] = []
