"""``tiexport.export()``: any torch.ao-quantized model -> a clean 8-bit QDQ ONNX model for TIDL's prequantized import.

Accepted models: fake-quant models (FX ``prepare_qat_fx``/``prepare_fx`` with fake-quant qconfigs, eager
``prepare_qat``, tiexport's PTCFxModule/QATFxModule, any ``FakeQuantizeBase`` subclass, per-tensor or per-channel,
including the fused moving-average fake-quant of torch's default QAT qconfig); converted models (``convert_fx``, eager
``convert``: ``torch.ops.quantized.*`` and quantized modules); reference models (``convert_to_reference_fx``); and
calibrated-but-unconverted ones (converted on a copy, with a warning). Both torch exporters work:
``exporter="torchscript"`` (deprecated in torch 2.9+, still present) and ``exporter="dynamo"`` (torch.export +
onnxscript, torch's default).

What the output guarantees:

- static input shapes (the example inputs' shapes), opset 17 by default (18+ on request; TIDL reads up to 19 and TI's
  own exports use 17 or 18, tidl.md §3), the lowest IR version for that opset, ``onnx.checker`` full check passed;
- every quantization site as ``QuantizeLinear -> DequantizeLinear`` with constant scale and zero point, int8/uint8
  only (tidl.md §2 "8-bit only"); weights stored as int8 initializers feeding a DequantizeLinear (no float weight
  behind a QuantizeLinear, tidl.md §6 item 5); per-channel weights on the output-channel axis;
- a site narrower than 8 bits (``quant_max - quant_min < 255``, e.g. 4-bit weights) keeps its integer range (weights
  stored within it; activations get a Clip before their QuantizeLinear) and adds a warning: TIDL's prequantized
  import takes 8-bit only and will use the full range;
- ``metadata_props``: ``tiexport_version``, ``exporter``, ``torch_version``, ``model_kind`` and, when the model (or its
  ``.module``) has a ``_tiexport_qconfig_type`` attribute, ``qconfig_type``; plus the caller's ``metadata``;
  ``producer_name`` is ``tiexport``.

**Q/DQ node names** (what ``tiexport.parity`` relies on to map fake-quant modules to ONNX nodes):

- a fake-quant module with qualified name ``<q>`` (``model.named_modules()``) becomes ``<q>/QuantizeLinear`` and
  ``<q>/DequantizeLinear`` (plus ``<q>/Clip`` for a restricted range); a weight fake-quant (its input a constant)
  becomes only ``<q>/DequantizeLinear`` reading the int8 initializer ``<q>.quantized``; scale and zero point are the
  initializers ``<q>.scale`` and ``<q>.zero_point``;
- a fake-quant module called more than once (shared) gets ``_1``, ``_2``... on its later sites' node names
  (``<q>/QuantizeLinear_1``), in graph order;
- converted models: ``<m>/...`` for the output of lowered quantized module ``<m>``, ``<m>.weight/DequantizeLinear``
  for its weight, the FX node name (``quantize_per_tensor``, ``add_relu``, ``cat``...) for functional sites;
- :attr:`ExportResult.sites` lists every site with its node names, so nobody has to parse names.

Inside the call: observers and fake-quant learning are frozen, every module's ``training`` flag is False, and all of
it is restored afterwards (see :mod:`tiexport.symbolics.lowering`); the exporter registrations are scoped to the call
and thread-safe (:mod:`tiexport.symbolics.registry`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from tiexport.errors import TiexportError, UsageError, first_line
from tiexport.passes.base import apply_passes
from tiexport.passes.expand_markers import ExpandQdqMarkersPass
from tiexport.passes.pipelines import export_pipeline
from tiexport.tidl_spec import get_spec

__all__ = ["EXPORTERS", "ExportError", "ExportResult", "export"]

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")


class ExportError(TiexportError):
    """The torch exporter (or the QDQ clean-up after it) failed on this model; the message names the step."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote."""

    path: Path
    exporter: str
    """``"torchscript"`` or ``"dynamo"``: the exporter that produced the file."""
    opset_version: int
    warnings: tuple[str, ...]
    """User-facing notes (also logged at WARNING): restricted ranges, disabled fake-quants, conversions made."""
    sites: tuple[Any, ...] = ()
    """Every quantization site (:class:`tiexport.passes.expand_markers.QdqSite`): module, node names, parameters."""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    model_kind: str = ""
    """``fake_quant``, ``converted``, ``mixed`` or ``float``."""

    def site_for(self, module: str) -> list[Any]:
        """The sites of one module (a fake-quant module's qualified name), in graph order."""
        return [s for s in self.sites if s.module == module]


def export(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    opset_version: int = 17,
    exporter: str = "torchscript",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    custom_translation_table: Mapping[Any, Any] | None = None,
) -> ExportResult:
    """Export a quantized torch model to a TIDL-ready QDQ ONNX file (see the module docstring for what it holds).

    ``example_inputs``: one tensor or a tuple of them; their shapes become the model's static input shapes.
    ``exporter``: ``"torchscript"`` (default; TI's own exports use it) or ``"dynamo"``.
    ``input_names``/``output_names``: default to ``forward``'s parameter names and ``output``/``output_<i>``.
    ``metadata``: extra ``metadata_props`` (str -> str). ``custom_translation_table``: the user's own dynamo
    translations, merged with tiexport's (dynamo only; TorchScript users register symbolics with
    ``torch.onnx.register_custom_op_symbolic`` as usual, and those stay registered).
    Raises UsageError for bad arguments or unsupported models, ExportError when the exporter fails.
    """
    import torch

    from tiexport import __version__, compat
    from tiexport.onnx_io import save_model
    from tiexport.symbolics import REGISTRY
    from tiexport.symbolics.lowering import ExportLowering
    from tiexport.symbolics.static_shapes import specialize_shapes

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"export() takes a torch.nn.Module, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise UsageError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    spec = get_spec()
    if not isinstance(opset_version, int) or opset_version < spec.min_opset:
        raise UsageError(f"opset_version must be an int >= {spec.min_opset} (per-axis Q/DQ), got {opset_version!r}")
    if exporter == "torchscript" and opset_version > compat.torchscript_max_opset():
        raise UsageError(f"the TorchScript exporter stops at opset {compat.torchscript_max_opset()}; use "
                         "exporter='dynamo' for newer opsets")
    if exporter == "dynamo" and not compat.has_dynamo_exporter():
        raise UsageError("the dynamo exporter needs torch >= 2.6 and onnxscript (pip install onnxscript)")
    if custom_translation_table and exporter != "dynamo":
        raise UsageError("custom_translation_table is for exporter='dynamo'; for TorchScript register symbolics "
                         "with torch.onnx.register_custom_op_symbolic")
    args = _as_args(example_inputs)
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: output folder does not exist")
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    notes: list[str] = []
    if opset_version > spec.max_opset:
        notes.append(f"opset {opset_version} is newer than TIDL reads (up to {spec.max_opset}, tidl.md §3)")

    with REGISTRY.scoped(exporter, opset_version) as table, torch.no_grad():
        lowering = ExportLowering(model, args)
        with lowering as export_model:
            notes.extend(lowering.warnings)
            export_model = specialize_shapes(export_model, args)
            outputs = _run(export_model, args)
            in_names = list(input_names) if input_names is not None else _default_input_names(model, len(args))
            out_names = list(output_names) if output_names is not None else _default_output_names(outputs)
            if len(in_names) != len(args):
                raise UsageError(f"{len(in_names)} input name(s) for {len(args)} input(s)")
            if len(out_names) != len(outputs):
                raise UsageError(f"{len(out_names)} output name(s) for {len(outputs)} output(s)")
            try:
                if exporter == "torchscript":
                    proto = onnx.load_from_string(compat.export_torchscript(
                        export_model, args, opset_version, in_names, out_names, REGISTRY.custom_opsets()))
                else:
                    merged = dict(custom_translation_table or {})
                    merged.update(table)  # ours win for our own op
                    proto = compat.export_dynamo(export_model, args, opset_version, in_names, out_names, merged)
            except TiexportError:
                raise
            except Exception as exc:
                raise ExportError(f"the {exporter} exporter failed: {first_line(exc)}") from exc
    try:
        passes = export_pipeline(opset_version)
        proto, _result = apply_passes(proto, passes, name=f"the {exporter} export", consume=True)
        sites = next(p for p in passes if isinstance(p, ExpandQdqMarkersPass)).sites
    except Exception as exc:
        raise ExportError(f"cleaning up the {exporter} export failed: {first_line(exc)}") from exc
    _set_metadata(proto, model, exporter, lowering.kind, extra, __version__, torch.__version__)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {first_line(exc)}") from exc
    save_model(proto, out)
    for note in notes:
        log.warning("%s", note)
    log.info("exported %s with the %s exporter (opset %d, %d Q/DQ sites)", out, exporter, opset_version, len(sites))
    return ExportResult(path=out, exporter=exporter, opset_version=opset_version, warnings=tuple(notes),
                        sites=tuple(sites), input_names=tuple(in_names), output_names=tuple(out_names),
                        model_kind=lowering.kind)


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (tuple, list)) or not args:
        raise UsageError("example_inputs must be a tensor or a non-empty tuple of tensors")
    args = tuple(args)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise UsageError(f"example input {i} is a {type(a).__name__}, not a tensor")
        if a.is_quantized:
            raise UsageError(f"example input {i} is a quantized tensor; pass the float input the model quantizes")
        if any(d <= 0 for d in a.shape):
            raise UsageError(f"example input {i} has shape {list(a.shape)}; TIDL needs every dimension > 0 "
                             "(tidl.md §2 static shapes)")
    return args


def _run(model: Any, args: tuple[Any, ...]) -> list[Any]:
    import torch

    from tiexport import compat

    try:
        with compat.quiet_torch():
            out = model(*args)
    except TiexportError:
        raise
    except Exception as exc:
        raise UsageError(f"the model does not run on example_inputs ({type(exc).__name__}: {first_line(exc)})") \
            from exc
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise UsageError("the model must return a tensor or a tuple/list of tensors")
    return outs


def _default_input_names(model: Any, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    if len(names) != n or len(set(names)) != n:
        return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]
    return names


def _default_output_names(outputs: list[Any]) -> list[str]:
    return ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]


def _set_metadata(proto: onnx.ModelProto, model: Any, exporter: str, kind: str, extra: dict[str, str],
                  version: str, torch_version: str) -> None:
    proto.producer_name = "tiexport"
    proto.producer_version = version
    props = {"tiexport_version": version, "exporter": exporter, "torch_version": torch_version, "model_kind": kind}
    qtype = getattr(model, "_tiexport_qconfig_type", None)
    if qtype is None:
        qtype = getattr(getattr(model, "module", None), "_tiexport_qconfig_type", None)
    if qtype is not None:
        props["qconfig_type"] = str(getattr(qtype, "name", qtype))
    props.update(extra)
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
