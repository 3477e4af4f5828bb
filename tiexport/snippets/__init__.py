"""Deployment snippets derived from the model: edgeai-benchmark config entries (Python, per benchmark release),
TIDL ONNX Runtime delegate options (Python or JSON), edgeai-benchmark / model-zoo YAML and edgeai-tidlrunner YAML.

Nothing here is a template filled from flags: the runtime-options function, the input section and the input
normalization are read off the model (:func:`analyze_model`), after :func:`tiexport.validate` has accepted it for the
device. Facts used (``shared/reference/tidl.md`` and the citations in :mod:`tiexport.snippets.versions`):

- §4 the delegate options: ``tidl_tools_path``/``artifacts_folder`` required; ``tensor_bits: 8``;
  ``accuracy_level: 0`` for QDQ/QAT models; ``debug_level: 0``; ``advanced_options:prequantized_model: 1`` (read the
  Q/DQ scales); ``advanced_options:quantization_scale_type``; ONNX Runtime graph optimizations disabled
  (``ORT_DISABLE_ALL``), the same for compile and inference; ``deny_list:layer_type`` / ``deny_list:layer_name``
  (edgeai-tidl-tools ``examples/osrt_python/README.md`` L132-133), ``object_detection:meta_arch_type`` /
  ``object_detection:meta_layers_names_list`` (L154-155; the types in ``docs/tidl_fsg_od_meta_arch.md`` L27-35),
  ``advanced_options:c7x_firmware_version`` (L201, from rel_10_00).
- §5 edgeai-benchmark: ``runtime_options_onnx_qat_v2`` / ``_v2_p2`` / ``_v1``; always
  ``{constants.ADVANCED_OPTIONS_QUANT_FILE_KEY: ''}`` so a stale ``_qparams.prototxt`` is never read (§6.6);
  ``input_optimization=False`` so mean/scale are not folded into a QAT model (§6.7); the common defaults
  ``pre_batchnorm_fold: 1`` and ``add_data_convert_ops: 3``.
- §1 AM62 has no accelerator (``tidl_offload`` off).

Decisions:

- Scale type follows the device: 1 (power-of-2) on TDA4VM, 4 (non-power-of-2, per-channel) on the MMAv2 devices,
  for every model and every format. edgeai-benchmark's YAML loader applies the device preset (4 on AM62A/AM67A/
  AM68A/AM69A, 1 on TDA4VM, where it also turns a 4 into 1) after a config's own options in every release, and 11.x
  does the same for Python entries, so a config cannot choose otherwise there; TI compiles its own power-of-2 QAT
  model (cl-6507) with 4 on the MMAv2 devices and its per-channel one (cl-6508) with 1 on TDA4VM under 11.x. A
  power-of-2 model loses nothing under 4 (its scales are read as they are). The Python entry states the scale type
  again in ``ext_options``, which every release applies last, so 9.2's "function wins" rule gives the same value.
  On TDA4VM a per-channel or asymmetric model is imported on TIDL's power-of-2 grid: validate warns and the header
  points at ``tiexport fix --device TDA4VM``.
- TI's legacy QAT v1 model (a float graph with power-of-2 Clip ranges, :attr:`ModelContext.qat_v1_clips`):
  ``runtime_options_onnx_qat_v1`` (``accuracy_level`` 0 via ``is_qat``, no ``prequantized_model``), as the v1 docs
  (``quantization/v1/docs/qat.md`` L120-126) and edgeai-benchmark r11.0 ``core/runtime_options.py`` L292-295 say;
  its scale type follows the device as above.
- Input normalization: when the model quantizes its input (a constant per-tensor QuantizeLinear), ``input_mean`` is
  its zero point moved to the pixel grid and ``input_scale`` its scale (uint8: mean = zp, scale = s; int8: mean =
  zp + 128), so the pixels 0..255 land on the quantizer's 256 steps without clipping or rounding. Otherwise the
  ImageNet values are placeholders, and the snippet says so.
- AM62 (no accelerator): ``benchmark``, ``yaml`` and ``tidlrunner`` are generated (the benchmark's AM62 preset turns
  ``tidl_offload`` off, so the entry runs on the Arm cores); ``tidl``/``tidl-json`` and :func:`runtime_options`
  refuse with a UsageError, because there is no TIDL delegate to configure.
- A model that validate rejects for the device (any error finding), and any float model, raises
  :class:`IncompatibleModelError` carrying the findings.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile, get_device
from tiexport.errors import TiexportError, UsageError
from tiexport.onnx_io import LoadedModel, as_model
from tiexport.snippets import render
from tiexport.snippets.analysis import (
    FORMAT_FLOAT,
    InputInfo,
    ModelAnalysis,
    analyze_context,
    analyze_model,
    benchmark_function,
    scale_type,
)
from tiexport.snippets.options import (
    QUANT_FILE_KEY,
    TASK_INFO,
    Checked,
    CompileExtras,
    delegate_options,
)
from tiexport.snippets.versions import BENCHMARK_VERSIONS, BenchmarkVersion, get_benchmark_version
from tiexport.validators.report import DeviceReport, Finding, Report
from tiexport.validators.rules.qdq import NotPrequantizedRule

__all__ = [
    "BENCHMARK_VERSIONS",
    "FORMATS",
    "QUANT_FILE_KEY",
    "TASKS",
    "IncompatibleModelError",
    "InputInfo",
    "ModelAnalysis",
    "analyze_model",
    "benchmark_function",
    "runtime_options",
    "scale_type",
    "snippet",
]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("benchmark", "tidl", "tidl-json", "yaml", "tidlrunner")
TASKS: tuple[str, ...] = tuple(TASK_INFO)


class IncompatibleModelError(TiexportError):
    """The model cannot be deployed on the device as it is: validate reported errors, or it is a float model.

    ``findings`` holds the error findings (all findings, warnings included, are in ``report``). The CLI prints them
    with a pointer to ``tiexport fix --device NAME`` when fix can remove every one of them, else with the rules it
    cannot fix and a pointer to re-exporting, and exits 1.
    """

    def __init__(self, model: str, device: str, findings: list[Finding], report: Report) -> None:
        self.model = model
        self.device = device
        self.findings = tuple(findings)
        self.report = report
        n = len(self.findings)
        unfixable = sorted({f.rule_id for f in self.findings if not f.fixable})
        if not unfixable:
            advice = f"Run `tiexport fix --device {device}` and try again"
        else:
            # never send the user to fix for what fix has said it cannot change
            advice = (f"{', '.join(unfixable)} {'is' if len(unfixable) == 1 else 'are'} not fixable by "
                      "`tiexport fix`: re-export or re-quantize the model (see the findings), then try again")
        super().__init__(
            f"{model} is not compatible with {device} ({n} error{'s' if n != 1 else ''}); no snippet generated. "
            f"{advice}"
        )


# ---------------------------------------------------------------------------------------------------- checks
def _check(model: Any, dev: DeviceProfile, benchmark: BenchmarkVersion) -> Checked:
    """Load, validate for one device, analyse; raise IncompatibleModelError on any error finding or a float model."""
    from tiexport.validators.validate import validate

    loaded = as_model(model)
    report = validate(loaded, dev)
    dev_report = report.devices[dev.name]
    ctx = ModelContext(loaded)
    analysis = analyze_context(ctx)
    errors = [f for f in dev_report.findings if f.severity == "error"]
    if analysis.format == FORMAT_FLOAT and not any(f.category == "not_prequantized" for f in errors):
        # The rule skips devices without an accelerator; a snippet for a float model is still wrong there.
        errors.extend(f for f in NotPrequantizedRule().check(ctx, dev) if f.severity == "error")
        dev_report = DeviceReport(dev.name, [*dev_report.findings, *errors])
        report = Report(model=report.model, devices={dev.name: dev_report})
    if errors:
        raise IncompatibleModelError(loaded.name, dev.name, errors, report)
    log.debug("%s on %s: %s", loaded.name, dev.name, analysis.describe())
    return Checked(loaded, dev, analysis, dev_report, benchmark)


def _no_accelerator(dev: DeviceProfile) -> UsageError:
    return UsageError(
        f"{dev.name} has no TIDL accelerator (tidl_offload off): there are no TIDL delegate options to generate; "
        "run the QDQ model with onnxruntime's CPUExecutionProvider, or use --format benchmark/yaml/tidlrunner, whose "
        f"entries run on the Arm cores for {dev.name}"
    )


def _stem(loaded: LoadedModel, model_path: str | None) -> str:
    src = model_path or (loaded.name if loaded.base_dir is not None else "")
    name = loaded.model.graph.name
    if isinstance(name, bytes):  # not valid UTF-8: protobuf hands it out as bytes; the stem only needs text
        name = name.decode("utf-8", "replace")
    stem = Path(src).stem if src else (name or "model")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "model"


def _model_path(loaded: LoadedModel, model_path: str | None) -> str:
    if model_path:
        return model_path
    if loaded.base_dir is not None:
        # loaded from a file: its absolute path, which TI's tools find from any working folder (a relative one
        # resolves against edgeai-benchmark's folder, or the config's folder for a bare YAML file name)
        return os.path.abspath(loaded.name)
    return f"{_stem(loaded, None)}.onnx"


def runtime_options(
    model: Any,
    device: str | DeviceProfile,
    *,
    tidl_tools_path: str = "$TIDL_TOOLS_PATH",
    artifacts_folder: str | None = None,
    sdk: str | None = None,
    benchmark_version: str | None = None,
    deny_layer_types: Iterable[str] | str | None = None,
    deny_layer_names: Iterable[str] | str | None = None,
    meta_arch_type: int | None = None,
    meta_layers_names_list: str | None = None,
    c7x_firmware_version: str | None = None,
) -> dict[str, Any]:
    """The TIDL ONNX Runtime delegate options for this model on this device (tidl.md §4), as a plain dict: the
    ``tidl-json`` snippet, and the values every other format passes to TIDL.

    ``quantization_scale_type`` follows the device (:func:`scale_type`); ``accuracy_level`` 0, ``tensor_bits`` 8,
    ``prequantized_model`` 1, ``debug_level`` 0 and an empty quant-params file (tidl.md §5, §6.6) are fixed for QDQ
    models. ``tidl_tools_path`` defaults to the literal ``$TIDL_TOOLS_PATH``: expand it (``envsubst``) to the tidl_tools
    built for this device's SOC. ``artifacts_folder`` defaults to ``artifacts/<model>_<device>``. ``sdk``: the TIDL SDK
    release to validate against (None: the latest known); ``benchmark_version``: the edgeai-benchmark release the
    options must agree with (None: the one of ``sdk``). ``deny_layer_types`` / ``deny_layer_names``: ops kept off
    TIDL; ``meta_arch_type`` + ``meta_layers_names_list``: a detection model's TIDL post-processing;
    ``c7x_firmware_version`` (SDK 10.0 on). Raises IncompatibleModelError when validate finds errors, UsageError for
    AM62 (no accelerator) or a bad option.
    """
    dev = get_device(device, sdk)
    if not dev.accelerator:  # independent of the model: say so before validating it
        raise _no_accelerator(dev)
    bench = get_benchmark_version(benchmark_version, dev.sdk)
    extras = CompileExtras.make(deny_layer_types=deny_layer_types, deny_layer_names=deny_layer_names,
                                meta_arch_type=meta_arch_type, meta_layers_names_list=meta_layers_names_list,
                                c7x_firmware_version=c7x_firmware_version, device=dev)
    checked = _check(model, dev, bench)
    folder = artifacts_folder or f"artifacts/{_stem(checked.loaded, None)}_{checked.device.name}"
    return delegate_options(checked, extras, tidl_tools_path, folder)


def snippet(
    model: Any,
    device: str | DeviceProfile,
    format: str,
    task: str = "classification",
    model_path: str | None = None,
    metrics: Mapping[str, float | int | str] | None = None,
    *,
    tidl_tools_path: str | None = None,
    artifacts_folder: str | None = None,
    sdk: str | None = None,
    benchmark_version: str | None = None,
    deny_layer_types: Iterable[str] | str | None = None,
    deny_layer_names: Iterable[str] | str | None = None,
    meta_arch_type: int | None = None,
    meta_layers_names_list: str | None = None,
    c7x_firmware_version: str | None = None,
) -> str:
    """Generate a deployment snippet for ``model`` on ``device``.

    ``format``: ``benchmark`` (edgeai-benchmark config entry, Python), ``tidl`` (delegate options, Python),
    ``tidl-json`` (the same options, JSON), ``yaml`` (edgeai-benchmark / model-zoo YAML config) or ``tidlrunner``
    (edgeai-tidlrunner config). ``task``: classification, detection or segmentation (pre/post-processing, dataset and
    metric key). ``model_path``: the path written into the snippet (default: the model file's absolute path).
    ``metrics``: ``model_info.metric_reference`` (default: the task's metric key with ``None``). ``sdk``: the TIDL SDK
    release to validate against (None: the latest known). ``benchmark_version``: the edgeai-benchmark release to
    write for (9.2 ... 11.2; None: the one released with ``sdk``). The compile options are those of
    :func:`runtime_options`. Raises IncompatibleModelError when the model is not deployable on the device.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown snippet format {format!r}; choose one of {', '.join(FORMATS)}")
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    dev = get_device(device, sdk)
    if format in ("tidl", "tidl-json") and not dev.accelerator:
        raise _no_accelerator(dev)
    bench = get_benchmark_version(benchmark_version, dev.sdk)
    extras = CompileExtras.make(deny_layer_types=deny_layer_types, deny_layer_names=deny_layer_names,
                                meta_arch_type=meta_arch_type, meta_layers_names_list=meta_layers_names_list,
                                c7x_firmware_version=c7x_firmware_version, device=dev, task=task)
    checked = _check(model, dev, bench)
    path = _model_path(checked.loaded, model_path)
    stem = _stem(checked.loaded, model_path)
    metric_reference = dict(metrics) if metrics else {TASK_INFO[task].metric_key: None}
    folder = artifacts_folder or f"artifacts/{stem}_{dev.name}"
    if format == "tidl-json":
        return json.dumps(delegate_options(checked, extras, tidl_tools_path or "$TIDL_TOOLS_PATH", folder),
                          indent=2) + "\n"
    if format == "tidl":
        return render.tidl_python(checked, extras, path, folder, tidl_tools_path)
    if format == "benchmark":
        return render.benchmark_python(checked, extras, task, path, stem, metric_reference)
    if format == "tidlrunner":
        return render.tidlrunner_yaml(checked, extras, task, path, stem, metric_reference)
    return render.benchmark_yaml(checked, extras, task, path, stem, metric_reference)
