"""Deployment snippets derived from the model: edgeai-benchmark config entries, TIDL ONNX Runtime delegate options
(Python or JSON) and edgeai-modelzoo style YAML.

Nothing here is a template filled from flags: the quantization scale type, the benchmark's runtime-options function
and the input section are read off the model (:func:`analyze_model`), after :func:`tiexport.validate` has accepted it
for the device. Facts used (``shared/reference/tidl.md``):

- §4 the delegate options: ``tidl_tools_path``/``artifacts_folder`` required; ``tensor_bits: 8``;
  ``accuracy_level: 0`` for QDQ/QAT models; ``debug_level: 0``; ``advanced_options:prequantized_model: 1`` (read the
  Q/DQ scales); ``advanced_options:quantization_scale_type`` 1 = power-of-2, 4 = non-power-of-2 per-channel (not
  TDA4VM); ONNX Runtime graph optimizations disabled (``ORT_DISABLE_ALL``), the same for compile and inference.
- §5 edgeai-benchmark: ``settings.runtime_options_onnx_qat_v2`` (scale type 4) and ``runtime_options_onnx_qat_v2_p2``
  (scale type 1, the TDA4VM choice); always ``{constants.ADVANCED_OPTIONS_QUANT_FILE_KEY: ''}`` so a stale
  ``_qparams.prototxt`` is never read (§6.6); ``input_optimization=False`` so mean/scale are not folded into a QAT
  model (§6.7); the ``cl-6508`` entry layout; the common defaults ``pre_batchnorm_fold: 1`` and
  ``add_data_convert_ops: 3``.
- §1 AM62 has no accelerator (``tidl_offload`` off).

Decisions:

- Scale type: per-channel weights -> 4 (``runtime_options_onnx_qat_v2``); otherwise every scale a power of two -> 1
  (``runtime_options_onnx_qat_v2_p2``), on every device, as TI does for its ``wt8sp2-at8sp2`` QAT models (cl-6507);
  otherwise 4. That includes TDA4VM: TI's own per-channel affine QAT v2 model (cl-6508) is compiled for every device
  with ``runtime_options_onnx_qat_v2`` (edgeai-tensorlab r11.0 ``edgeai-benchmark/configs/classification_v2.py``
  L63-66), whose scale type 4 overrides the TDA4VM preset's 1 (``core/runtime_options.py``: the function's kwargs
  win over ``self.runtime_options``), and TI ships TDA4VM artifacts of it. TI's docs say TDA4VM supports neither
  asymmetric nor per-channel quantization, so validate warns and the header says what ``tiexport fix --device
  TDA4VM`` changes.
- TI's legacy QAT v1 model (a float graph with power-of-2 Clip ranges, :attr:`ModelContext.qat_v1_clips`):
  ``runtime_options_onnx_qat_v1`` (scale type 1, ``accuracy_level`` 0 via ``is_qat``, no ``prequantized_model``),
  as the v1 docs (``quantization/v1/docs/qat.md`` L120-126) and edgeai-benchmark r11.0 ``core/runtime_options.py``
  L292-295 say.
- AM62 (no accelerator): ``benchmark`` and ``yaml`` are generated (the benchmark's AM62 preset turns
  ``tidl_offload`` off, so the entry runs on the Arm cores; the YAML says ``tidl_offload: false`` and carries no
  runtime options); ``tidl``/``tidl-json`` and :func:`runtime_options` refuse with a UsageError, because there is no
  TIDL delegate to configure.
- A model that validate rejects for the device (any error finding), and any float model, raises
  :class:`IncompatibleModelError` carrying the findings.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile, get_device
from tiexport.errors import TiexportError, UsageError
from tiexport.onnx_io import LoadedModel, as_model
from tiexport.snippets.analysis import (
    FORMAT_FLOAT,
    FORMAT_QAT_V1,
    SCALE_TYPE_NP2_PERCHAN,
    SCALE_TYPE_P2,
    InputInfo,
    ModelAnalysis,
    analyze_context,
    analyze_model,
    benchmark_function,
    scale_type,
)
from tiexport.snippets.yaml_text import Commented, yaml_lines
from tiexport.validators.report import DeviceReport, Finding, Report
from tiexport.validators.rules.qdq import NotPrequantizedRule

__all__ = [
    "FORMATS",
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

FORMATS: tuple[str, ...] = ("benchmark", "tidl", "tidl-json", "yaml")
TASKS: tuple[str, ...] = ("classification", "detection", "segmentation")

QUANT_FILE_KEY = "advanced_options:quant_params_proto_path"
"""The value of edgeai-benchmark's ``constants.ADVANCED_OPTIONS_QUANT_FILE_KEY`` (tidl.md §5)."""

# The benchmark's get_onnx_session_cfg defaults (ImageNet RGB mean/scale): placeholders only.
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_SCALE = (0.017125, 0.017507, 0.017429)


@dataclass(frozen=True)
class _TaskInfo:
    prefix: str
    dataset_category: str
    postprocess_call: str
    metric_key: str
    yaml_postprocess: dict[str, Any]


# Per task: the config-id prefix, dataset and postprocess call TI's own configs use (configs/classification_v2.py,
# detection_v2.py, segmentation.py), and the metric key their model_info.metric_reference uses.
_TASKS: dict[str, _TaskInfo] = {
    "classification": _TaskInfo("cl", "DATASET_CATEGORY_IMAGENET", "get_transform_classification()",
                                "accuracy_top1%", {}),
    "detection": _TaskInfo("od", "DATASET_CATEGORY_COCO", "get_transform_detection_onnx()",
                           "accuracy_ap[.5:.95]%",
                           {"formatter": None, "resize_with_pad": False, "normalized_detections": True,
                            "shuffle_indices": None, "squeeze_axis": 0}),
    "segmentation": _TaskInfo("ss", "DATASET_CATEGORY_ADE20K", "get_transform_segmentation_onnx()",
                              "accuracy_mean_iou%", {"data_layout": "NCHW", "with_argmax": True}),
}


class IncompatibleModelError(TiexportError):
    """The model cannot be deployed on the device as it is: validate reported errors, or it is a float model.

    ``findings`` holds the error findings (all findings, warnings included, are in ``report``). The CLI prints them
    with a pointer to ``tiexport fix --device NAME`` and exits 1.
    """

    def __init__(self, model: str, device: str, findings: list[Finding], report: Report) -> None:
        self.model = model
        self.device = device
        self.findings = tuple(findings)
        self.report = report
        n = len(self.findings)
        super().__init__(
            f"{model} is not compatible with {device} ({n} error{'s' if n != 1 else ''}); no snippet generated. "
            f"Run `tiexport fix --device {device}` (or re-export the model) and try again"
        )


# ---------------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class _Checked:
    loaded: LoadedModel
    device: DeviceProfile
    analysis: ModelAnalysis
    report: DeviceReport


def _check(model: Any, device: str | DeviceProfile) -> _Checked:
    """Load, validate for one device, analyse; raise IncompatibleModelError on any error finding or a float model."""
    from tiexport.validators.validate import validate

    loaded = as_model(model)
    dev = get_device(device)
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
    return _Checked(loaded, dev, analysis, dev_report)


def _no_accelerator(dev: DeviceProfile) -> UsageError:
    return UsageError(
        f"{dev.name} has no TIDL accelerator (tidl_offload off): there are no TIDL delegate options to generate; "
        "run the QDQ model with onnxruntime's CPUExecutionProvider, or use --format benchmark/yaml, whose entries "
        f"run on the Arm cores for {dev.name}"
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
    if loaded.base_dir is not None:  # loaded from a file: its path as given
        return loaded.name
    return f"{_stem(loaded, None)}.onnx"


def _options(checked: _Checked, tidl_tools_path: str, artifacts_folder: str) -> dict[str, Any]:
    st = scale_type(checked.analysis, checked.device)
    # QAT v1: TIDL reads the ranges from the Clip nodes (accuracy_level 0, scale type 1); prequantized_model is for
    # Q/DQ models only (edgeai-benchmark's runtime_options_onnx_qat_v1 leaves it out)
    prequantized = {} if checked.analysis.format == FORMAT_QAT_V1 else {"advanced_options:prequantized_model": 1}
    return {
        "tidl_tools_path": tidl_tools_path,
        "artifacts_folder": artifacts_folder,
        "tensor_bits": 8,
        "accuracy_level": 0,
        "debug_level": 0,
        **prequantized,
        "advanced_options:quantization_scale_type": st,
        QUANT_FILE_KEY: "",
        "advanced_options:pre_batchnorm_fold": 1,
        "advanced_options:add_data_convert_ops": 3,
    }


def runtime_options(
    model: Any,
    device: str | DeviceProfile,
    *,
    tidl_tools_path: str = "$TIDL_TOOLS_PATH",
    artifacts_folder: str | None = None,
    sdk: str | None = None,
) -> dict[str, Any]:
    """The TIDL ONNX Runtime delegate options for this model on this device (tidl.md §4), as a plain dict.

    ``quantization_scale_type`` comes from the model (:func:`scale_type`); ``accuracy_level`` 0, ``tensor_bits`` 8,
    ``prequantized_model`` 1, ``debug_level`` 0 and an empty quant-params file (tidl.md §5, §6.6) are fixed for QDQ
    models. ``tidl_tools_path`` defaults to the literal ``$TIDL_TOOLS_PATH`` (expand it, e.g. with ``envsubst``);
    ``artifacts_folder`` to ``artifacts/<model>_<device>``.
    ``sdk``: the TIDL SDK release to validate against (None: the latest known).
    Raises IncompatibleModelError when validate finds errors, UsageError for AM62 (no accelerator).
    """
    dev = get_device(device, sdk)
    if not dev.accelerator:  # independent of the model: say so before validating it
        raise _no_accelerator(dev)
    checked = _check(model, dev)
    folder = artifacts_folder or f"artifacts/{_stem(checked.loaded, None)}_{checked.device.name}"
    return _options(checked, tidl_tools_path, folder)


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
) -> str:
    """Generate a deployment snippet for ``model`` on ``device``.

    ``format``: ``benchmark`` (edgeai-benchmark config entry, Python), ``tidl`` (delegate options, Python),
    ``tidl-json`` (the same options, JSON) or ``yaml`` (edgeai-modelzoo style config). ``task``: classification,
    detection or segmentation (pre/post-processing calls and the metric key). ``model_path``: the path written into
    the snippet (default: the model's path). ``metrics``: ``model_info.metric_reference`` (default: the task's metric
    key with ``None``). ``sdk``: the TIDL SDK release to validate against (None: the latest known). Raises
    IncompatibleModelError when the model is not deployable on the device.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown snippet format {format!r}; choose one of {', '.join(FORMATS)}")
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    dev = get_device(device, sdk)
    if format in ("tidl", "tidl-json") and not dev.accelerator:
        raise _no_accelerator(dev)
    checked = _check(model, dev)
    path = _model_path(checked.loaded, model_path)
    stem = _stem(checked.loaded, model_path)
    metric_reference = dict(metrics) if metrics else {_TASKS[task].metric_key: None}
    folder = artifacts_folder or f"artifacts/{stem}_{dev.name}"
    if format == "tidl-json":
        return json.dumps(_options(checked, tidl_tools_path or "$TIDL_TOOLS_PATH", folder), indent=2) + "\n"
    if format == "tidl":
        return _tidl_python(checked, path, folder, tidl_tools_path)
    if format == "benchmark":
        return _benchmark_python(checked, task, path, stem, metric_reference)
    return _modelzoo_yaml(checked, task, path, folder, metric_reference)


# ---------------------------------------------------------------------------------------------------- renderers
def _header(checked: _Checked, what: str, comment: str = "#") -> list[str]:
    from tiexport import __version__

    a = checked.analysis
    warnings = checked.report.count("warning")
    lines = [
        f"{what} generated by tiexport {__version__} for {a.name} on {checked.device.name}, checked against TIDL "
        f"SDK {checked.device.sdk}.",
        f"Model: {a.describe()}.",
    ]
    for inp in a.inputs:
        q = ""
        if inp.quant_range is not None:
            q = f", quantized {inp.quant_dtype} over [{inp.quant_range[0]:.6g}, {inp.quant_range[1]:.6g}]"
        lines.append(f"Input {inp.name!r}: shape {list(inp.shape) if inp.shape is not None else '?'}, {inp.dtype}{q}.")
    if checked.device.accelerator:
        st = scale_type(a, checked.device)
        lines.append(f"quantization_scale_type {st} ({'power-of-2' if st == 1 else 'non-power-of-2 per-channel'}), "
                     f"edgeai-benchmark: settings.{benchmark_function(st, a.format)}.")
        if a.format == FORMAT_QAT_V1:
            lines.append("TIDL QAT v1: TIDL takes the ranges from the Clip nodes (accuracy_level 0, no "
                         "prequantized_model); TI documents this flow for TDA4VM.")
        elif not checked.device.per_channel_weights and (st == SCALE_TYPE_NP2_PERCHAN or not a.symmetric):
            lines.append(f"{checked.device.name} supports neither per-channel nor asymmetric quantization (TI's docs); "
                         "TI compiles such models for it with these options (cl-6508) and TIDL imports them on its "
                         f"own grid. For outputs that match this model, run tiexport fix --device "
                         f"{checked.device.name} first.")
    else:
        lines.append(f"{checked.device.name} has no TIDL accelerator: the model runs in ONNX Runtime on the Arm cores.")
    lines.append(f"tiexport validate: {checked.report.verdict}"
                 + (f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else "") + ".")
    return [f"{comment} {line}" if comment else line for line in lines]


def _docstring(lines: list[str]) -> str:
    """A module docstring for generated Python; model names may hold backslashes or quotes."""
    text = "\n".join(lines).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return '"""' + text + '\n"""'


def _py_tuple(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(repr(float(v)) for v in values) + ("," if len(values) == 1 else "") + ")"


def _mean_scale(analysis: ModelAnalysis) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = analysis.inputs[0].channels if analysis.inputs else None
    if c is None or c == 3:
        return _IMAGENET_MEAN, _IMAGENET_SCALE
    return (0.0,) * c, (1.0,) * c


def _resize_crop(analysis: ModelAnalysis, task: str) -> tuple[Any, Any] | None:
    hw = analysis.inputs[0].hw if analysis.inputs else None
    if hw is None:
        return None
    h, w = hw
    if task == "classification" and h == w:
        # TI's ImageNet configs resize the short side to 256/224 of the crop, then centre-crop to the input size
        return round(h * 256 / 224), h
    return (h, w), (h, w)


def _benchmark_python(checked: _Checked, task: str, model_path: str, stem: str,
                      metric_reference: dict[str, Any]) -> str:
    a = checked.analysis
    t = _TASKS[task]
    st = scale_type(a, checked.device) if checked.device.accelerator else (
        SCALE_TYPE_P2 if a.format == FORMAT_QAT_V1 or (a.power_of_two and not a.per_channel_weights)
        else SCALE_TYPE_NP2_PERCHAN)
    func = benchmark_function(st, a.format)
    mean, scale = _mean_scale(a)
    rc = _resize_crop(a, task)
    pre_args = f"resize={rc[0]!r}, crop={rc[1]!r}" if rc else ""
    rt_args = ("det_options=True, " if task == "detection" else "") + "**quant_params_proto_path_disable_option"
    key = f"{t.prefix}-{stem}"
    doc = _header(checked, "edgeai-benchmark config entry", comment="")
    doc += [
        "",
        "Put this file into edgeai-benchmark's configs/ (or merge the entry into an existing get_configs).",
        "input_mean/input_scale are placeholders: set the normalization the model was trained with.",
    ]
    if not checked.device.accelerator:
        doc.append(f"On {checked.device.name} the benchmark's preset turns tidl_offload off and ignores the "
                   "runtime options.")
    if len(a.inputs) > 1:
        doc.append(f"The model has {len(a.inputs)} inputs; this entry describes the first one.")
    lines = [
        _docstring(doc),
        "",
        "from edgeai_benchmark import constants, datasets, postprocess, preprocess, sessions, utils",
        "",
        "",
        "def get_configs(settings, work_dir):",
        "    onnx_session_type = settings.get_session_type(constants.MODEL_TYPE_ONNX)",
        "    preproc_transforms = preprocess.PreProcessTransforms(settings)",
        "    postproc_transforms = postprocess.PostProcessTransforms(settings)",
        "",
        "    common_cfg = {",
        f"        'task_type': {task!r},",
        f"        'dataset_category': datasets.{t.dataset_category},",
        f"        'calibration_dataset': settings.dataset_cache[datasets.{t.dataset_category}]['calibration_dataset'],",
        f"        'input_dataset': settings.dataset_cache[datasets.{t.dataset_category}]['input_dataset'],",
        f"        'postprocess': postproc_transforms.{t.postprocess_call},",
        "    }",
        "",
        "    # never read a stale <model>_qparams.prototxt: the "
        + ("ranges come from the model's Clip nodes" if a.format == FORMAT_QAT_V1
           else "scales come from the model's Q/DQ nodes"),
        "    quant_params_proto_path_disable_option = {constants.ADVANCED_OPTIONS_QUANT_FILE_KEY: ''}",
        "",
        "    pipeline_configs = {",
        f"        {key!r}: utils.dict_update(",
        "            common_cfg,",
        f"            preprocess=preproc_transforms.get_transform_onnx({pre_args}),",
        "            session=onnx_session_type(",
        "                # QAT/QDQ model: keep mean/scale out of the model (input_optimization=False)",
        "                **sessions.get_onnx_session_cfg(",
        "                    settings, work_dir=work_dir, input_optimization=False,",
        f"                    input_mean={_py_tuple(mean)}, input_scale={_py_tuple(scale)}),",
        f"                runtime_options=settings.{func}({rt_args}),",
        f"                model_path={model_path!r}),",
        f"            model_info=dict(metric_reference={metric_reference!r}),",
        "        ),",
        "    }",
        "    return pipeline_configs",
        "",
    ]
    return "\n".join(lines)


def _tidl_python(checked: _Checked, model_path: str, artifacts_folder: str, tidl_tools_path: str | None) -> str:
    opts = _options(checked, "__TOOLS__", artifacts_folder)
    body = []
    for k, v in opts.items():
        value = ('os.environ["TIDL_TOOLS_PATH"]' if tidl_tools_path is None else repr(tidl_tools_path)) \
            if k == "tidl_tools_path" else repr(v)
        body.append(f"    {k!r}: {value},")
    doc = _header(checked, "TIDL ONNX Runtime delegate options", comment="")
    doc.append("Compile once on the PC with TIDLCompilationProvider (writes artifacts_folder), then run on the device "
               "with TIDLExecutionProvider and the same options.")
    lines = [
        _docstring(doc),
        "",
        "import os",
        "",
        "import onnxruntime as ort",
        "",
        f"model_path = {model_path!r}",
        "",
        "delegate_options = {",
        *body,
        "}",
        "",
        "",
        "def make_session(compile_model=False):",
        '    """An ONNX Runtime session that offloads to TIDL (compile_model=True on the PC writes the artifacts)."""',
        "    so = ort.SessionOptions()",
        "    # TI recommends ORT graph optimizations off, identical for compile and inference",
        "    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL",
        "    if compile_model:",
        "        os.makedirs(delegate_options['artifacts_folder'], exist_ok=True)",
        "    provider = 'TIDLCompilationProvider' if compile_model else 'TIDLExecutionProvider'",
        "    return ort.InferenceSession(model_path, providers=[provider, 'CPUExecutionProvider'],",
        "                                provider_options=[delegate_options, {}], sess_options=so)",
        "",
    ]
    return "\n".join(lines)


def _modelzoo_yaml(checked: _Checked, task: str, model_path: str, artifacts_folder: str,
                   metric_reference: dict[str, Any]) -> str:
    a = checked.analysis
    dev = checked.device
    mean, scale = _mean_scale(a)
    rc = _resize_crop(a, task)
    first = a.inputs[0] if a.inputs else None
    range_note = ""
    if first is not None and first.quant_range is not None:
        range_note = f"; the model quantizes its input over [{first.quant_range[0]:.6g}, {first.quant_range[1]:.6g}]"
    session: dict[str, Any] = {
        "session_name": "onnxrt",
        "model_path": model_path,
        "artifacts_folder": artifacts_folder,
        "target_device": dev.name,
        "tidl_offload": dev.accelerator,
        "input_optimization": Commented(False, "QAT/QDQ model: mean/scale stay out of the model"),
        "input_data_layout": "NCHW",
        "input_mean": Commented(list(mean), "placeholder: the mean the model was trained with"),
        "input_scale": Commented(list(scale), "placeholder: the scale the model was trained with" + range_note),
    }
    if first is not None:
        session["input_details"] = {
            "name": first.name,
            "shape": list(first.shape) if first.shape is not None else None,
            "type": first.dtype,
        }
    if dev.accelerator:
        opts = _options(checked, "$TIDL_TOOLS_PATH", artifacts_folder)
        # the model-zoo config is device-independent of the tools install: the paths live in the session
        session["runtime_options"] = {k: v for k, v in opts.items() if k not in ("tidl_tools_path", "artifacts_folder")}
    else:
        session["runtime_options"] = {}
    preprocess: dict[str, Any] = {}
    if rc is not None:
        preprocess["resize"] = list(rc[0]) if isinstance(rc[0], tuple) else rc[0]
        preprocess["crop"] = list(rc[1]) if isinstance(rc[1], tuple) else rc[1]
    preprocess.update({"data_layout": "NCHW", "reverse_channels": False, "resize_with_pad": False,
                       "backend": "pil", "add_flip_image": False})
    doc: dict[str, Any] = {
        "task_type": task,
        "target_device": dev.name,
        "session": session,
        "preprocess": preprocess,
        "postprocess": dict(_TASKS[task].yaml_postprocess),
        "model_info": {"metric_reference": metric_reference},
    }
    header = _header(checked, "edgeai-modelzoo style config", comment="#")
    return "\n".join([*header, *yaml_lines(doc)]) + "\n"
