"""Custom export-time ops for quantized models and their translations for both torch ONNX exporters.

- :mod:`~tiexport.symbolics.ops`: the torch op every quantization site is lowered to
  (``tiexport::quantize_dequantize``);
- :mod:`~tiexport.symbolics.registry`: one registry, each op's TorchScript symbolic and dynamo translation side by
  side, registered only for the duration of an export (:meth:`SymbolicRegistry.scoped`);
- :mod:`~tiexport.symbolics.qdq`: the translations of that op;
- :mod:`~tiexport.symbolics.lowering`: :class:`~tiexport.symbolics.lowering.ExportLowering`, the context in which
  any torch.ao-quantized model calls that op at every quantization site, built from
  :mod:`~tiexport.symbolics.specs` (quantization parameters read off fake-quants and quantized tensors),
  :mod:`~tiexport.symbolics.modules` (float stand-ins for quantized modules) and
  :mod:`~tiexport.symbolics.converted` (FX rewriting of converted models);
- :mod:`~tiexport.symbolics.export`: :func:`tiexport.export`, which runs the exporter in that scope and then the
  export pass pipeline (:func:`tiexport.passes.pipelines.export_pipeline`) that turns the exporters' output into
  clean QDQ ONNX.

The registry and the translations import no torch at module level (the lowering modules do): the ONNX side stays
usable without it.
"""

from __future__ import annotations

from tiexport.symbolics import qdq as _qdq  # noqa: F401  (adds the quantize-dequantize op to REGISTRY)
from tiexport.symbolics.registry import REGISTRY, ExportOp, SymbolicRegistry

__all__ = ["REGISTRY", "ExportOp", "SymbolicRegistry"]
