"""``export_checked()``: a quantized torch model to a deployable QDQ ONNX file, proven end to end.

What the PTC/QAT wrappers' ``export()`` runs (FX and PT2E alike), in order: :func:`tiexport.export` writes the QDQ
ONNX; with a ``device``, :func:`tiexport.fix` rewrites that file in place for it (the file this call just wrote,
never a user's input); :func:`tiexport.check_parity` compares the torch module with the file in ONNX Runtime, and
when that fails for a module on a GPU, a CPU copy of the module as well (GPU float kernels round differently from
ONNX Runtime's CPU ones, which can move a quantized output by a step or two); :func:`tiexport.validate` checks the
file for the device (every device when none is given).

No torch import at module level: the module is handed to the exporter and to parity's torch reference.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from tiexport.compat import module_device
from tiexport.errors import UsageError
from tiexport.parity import ParityReport, check_parity
from tiexport.validators.report import Report
from tiexport.validators.validate import validate
from tiexport.workflows.fix import FixReport, fix

__all__ = ["QuantExportResult", "export_checked"]

log = logging.getLogger(__name__)


@dataclass
class QuantExportResult:
    """What :func:`export_checked` (and the wrappers' ``export()``) produced."""

    path: Path
    export_result: Any
    """The :class:`tiexport.ExportResult` of the torch export (sites, warnings, names)."""
    fix_report: FixReport | None = None
    parity: ParityReport | None = None
    validation: Report | None = None
    notes: list[str] = field(default_factory=list)
    parity_cpu: ParityReport | None = None
    """When parity against a module on a GPU failed: the same check against a CPU copy of the module."""

    @property
    def parity_passed(self) -> bool | None:
        return None if self.parity is None else bool(self.parity.passed)

    @property
    def parity_summary(self) -> str:
        return "not checked" if self.parity is None else self.parity.summary()


def export_checked(
    module: Any,
    args: tuple[Any, ...],
    path: str | os.PathLike[str],
    *,
    opset_version: int = 17,
    device: str | None = None,
    exporter: str = "torchscript",
    parity: bool = True,
    parity_inputs: Any = None,
    fix_options: dict[str, Any] | None = None,
    **export_kwargs: Any,
) -> QuantExportResult:
    """Export ``module`` (in eval mode) on the positional ``args`` to ``path``, fix it for ``device``, check parity
    against ``module`` and validate (see the module docstring).

    ``parity_inputs``: anything :func:`tiexport.check_parity` takes (default: ``args``). ``fix_options``: keyword
    arguments of :func:`tiexport.fix`. Other keyword arguments go to :func:`tiexport.export` (``input_names``,
    ``output_names``, ``metadata``...).
    """
    from tiexport.symbolics.export import export  # the torch side, imported when a torch model is exported

    path = Path(path)
    export_result = export(module, args, path, opset_version=opset_version, exporter=exporter, **export_kwargs)
    fix_report = None
    if device is not None:
        # the export is ours to replace: the fixed model is written over it (protect=())
        _fixed, fix_report = fix(str(path), device=device, output=path, protect=(), **(fix_options or {}))
        log.info("fixed %s for %s", path, device)
    parity_report = parity_cpu = None
    notes: list[str] = []
    if parity:
        if parity_inputs is None:
            parity_inputs = _parity_batches(path, args)
        parity_report = check_parity(module, str(path), inputs=parity_inputs)
        log.info("parity against the torch module: %s", parity_report.summary())
        where = module_device(module)
        if not parity_report.passed and where.type != "cpu":
            # A GPU's float kernels (matmul, softmax, layer norm) round differently from ONNX Runtime's CPU
            # ones; one ulp at a rounding boundary moves a quantized value by a step, and attention carries
            # such steps on (GPU smoke run: a TransformerBlock 2 LSB off on CUDA, 0 on the CPU). The same
            # module on the CPU tells that apart from an export error.
            parity_cpu = check_parity(copy.deepcopy(module).cpu(), str(path), inputs=parity_inputs)
            verdict = ("passes there: the difference is the GPU's float rounding, not the export"
                       if parity_cpu.passed else "fails there too: the export differs from the module")
            notes.append(f"parity against the module on {where} failed; on the CPU it {verdict} "
                         f"({parity_cpu.summary()})")
            log.warning("%s", notes[-1])
    validation = validate(str(path), device=device if device is not None else "all")
    return QuantExportResult(
        path=path, export_result=export_result, fix_report=fix_report, parity=parity_report, validation=validation,
        notes=notes, parity_cpu=parity_cpu,
    )


def _parity_batches(path: Path, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    """One sample for the parity checker: the ONNX model's input names with the example tensors, in order."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if len(names) != len(args):
        raise UsageError(f"{path} has {len(names)} input(s), example_inputs {len(args)}")
    return [{n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}]
