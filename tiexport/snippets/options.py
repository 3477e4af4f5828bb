"""The option values every snippet format shares: the TIDL delegate options of a checked model, the extra compile
options a user may add (deny lists, detection meta-architecture, C7x firmware version), the per-task dataset and
post-processing facts, and the input normalization read off the model's input quantizer."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tiexport.devices import DeviceProfile
from tiexport.errors import UsageError
from tiexport.onnx_io import LoadedModel
from tiexport.snippets.analysis import FORMAT_QAT_V1, ModelAnalysis, scale_type
from tiexport.snippets.versions import BenchmarkVersion
from tiexport.validators.report import DeviceReport

__all__ = [
    "META_ARCH_TYPES",
    "QUANT_FILE_KEY",
    "TASK_INFO",
    "Checked",
    "CompileExtras",
    "Normalization",
    "TaskInfo",
    "delegate_options",
    "normalization",
]

QUANT_FILE_KEY = "advanced_options:quant_params_proto_path"
"""The value of edgeai-benchmark's ``constants.ADVANCED_OPTIONS_QUANT_FILE_KEY`` (tidl.md §5)."""

# edgeai-tidl-tools rel_11_00 docs/tidl_fsg_od_meta_arch.md L27-35: the ONNX meta-architectures (1 is TFLite SSD).
META_ARCH_TYPES: dict[int, str] = {
    3: "ONNX SSD", 4: "YOLO V3", 5: "RetinaNet / EfficientDet", 6: "YOLO-X / YOLO-V5 / YOLO-V7",
    7: "PointPillars 3D OD", 8: "YOLO-V8",
}

# The benchmark's get_onnx_session_cfg defaults (ImageNet RGB mean/scale; r11.2 sessions/__init__.py L95-96).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_SCALE = (0.017125, 0.017507, 0.017429)


@dataclass(frozen=True)
class Checked:
    """A model validated for one device, with what the snippets are derived from."""

    loaded: LoadedModel
    device: DeviceProfile
    analysis: ModelAnalysis
    report: DeviceReport
    benchmark: BenchmarkVersion


@dataclass(frozen=True)
class TaskInfo:
    prefix: str
    dataset_category: str
    """edgeai-benchmark's ``datasets.DATASET_CATEGORY_*`` name (Python entry)."""
    dataset: str
    """Its value, as TI's YAML configs write it (``imagenet``, ``coco``, ``ade20k``)."""
    postprocess_call: str
    metric_key: str
    yaml_postprocess: dict[str, Any]
    tidlrunner_postprocess: str


# Per task: the config-id prefix, dataset and postprocess call TI's own configs use (configs/classification_v2.py,
# detection_v2.py, segmentation.py), the metric key of their model_info.metric_reference, and the postprocess name
# edgeai-tidlrunner's model-zoo configs give (data/configs/modelzoo/**/*_config.yaml).
TASK_INFO: dict[str, TaskInfo] = {
    "classification": TaskInfo("cl", "DATASET_CATEGORY_IMAGENET", "imagenet", "get_transform_classification()",
                               "accuracy_top1%", {}, "classification_postprocess"),
    "detection": TaskInfo("od", "DATASET_CATEGORY_COCO", "coco", "get_transform_detection_onnx()",
                          "accuracy_ap[.5:.95]%",
                          {"formatter": None, "resize_with_pad": False, "normalized_detections": True,
                           "shuffle_indices": None, "squeeze_axis": 0}, "detection_postprocess"),
    "segmentation": TaskInfo("ss", "DATASET_CATEGORY_ADE20K", "ade20k", "get_transform_segmentation_onnx()",
                             "accuracy_mean_iou%", {"data_layout": "NCHW", "with_argmax": True},
                             "segmentation_postprocess"),
}

_FIRMWARE = re.compile(r"\d{2}_\d{2}_\d{2}_\d{2}")


def _names(values: Iterable[str] | str | None, what: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = values.split(",")
    out: list[str] = []
    for v in values:
        if not isinstance(v, str):
            raise UsageError(f"{what} must be strings, got {type(v).__name__}")
        for part in v.split(","):
            if part.strip():
                out.append(part.strip())
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class CompileExtras:
    """Compile options the model cannot tell: offload exclusions, the detection meta-architecture, firmware."""

    deny_layer_types: tuple[str, ...] = ()
    deny_layer_names: tuple[str, ...] = ()
    meta_arch_type: int | None = None
    meta_layers_names_list: str | None = None
    c7x_firmware_version: str | None = None

    @classmethod
    def make(cls, *, deny_layer_types: Iterable[str] | str | None = None,
             deny_layer_names: Iterable[str] | str | None = None, meta_arch_type: int | None = None,
             meta_layers_names_list: str | None = None, c7x_firmware_version: str | None = None,
             device: DeviceProfile, task: str | None = None) -> CompileExtras:
        """Checked options: UsageError for a value TIDL would not take (one line)."""
        if (meta_arch_type is None) != (meta_layers_names_list is None):
            raise UsageError("the detection meta-architecture needs both meta_arch_type and meta_layers_names_list "
                             "(TIDL reads the post-processing from the prototxt the list names)")
        if meta_arch_type is not None:
            if task is not None and task != "detection":
                raise UsageError(f"a detection meta-architecture is for --task detection, not {task}")
            if isinstance(meta_arch_type, bool) or not isinstance(meta_arch_type, int) \
                    or meta_arch_type not in META_ARCH_TYPES:
                known = ", ".join(f"{k} ({v})" for k, v in META_ARCH_TYPES.items())
                raise UsageError(f"unknown object_detection:meta_arch_type {meta_arch_type!r}; ONNX models: {known}")
            if not isinstance(meta_layers_names_list, str) or not meta_layers_names_list.strip():
                raise UsageError("meta_layers_names_list must be the path of the meta-architecture prototxt")
        if c7x_firmware_version is not None:
            if not isinstance(c7x_firmware_version, str) or not _FIRMWARE.fullmatch(c7x_firmware_version):
                raise UsageError(f"c7x_firmware_version must look like 10_01_04_00, got {c7x_firmware_version!r}")
            line = device.sdk.split(".")
            major, minor = (int(line[0]), int(line[1]) if len(line) > 1 else 0)
            if (major, minor) < (10, 0):
                raise UsageError(f"advanced_options:c7x_firmware_version exists from TIDL SDK 10.0 on, not in "
                                 f"{device.sdk} (edgeai-tidl-tools rel_10_00 examples/osrt_python/README.md L201)")
            if c7x_firmware_version[:5] != f"{major:02d}_{minor:02d}":
                raise UsageError(f"c7x_firmware_version {c7x_firmware_version} is not of the SDK {device.sdk} release "
                                 f"line ({major:02d}_{minor:02d}_xx_xx); pass the matching --sdk")
        return cls(_names(deny_layer_types, "deny_layer_types"), _names(deny_layer_names, "deny_layer_names"),
                   meta_arch_type, meta_layers_names_list, c7x_firmware_version)

    def options(self) -> dict[str, Any]:
        """The runtime options these extras add, in TI's spelling (comma-separated lists)."""
        out: dict[str, Any] = {}
        if self.deny_layer_types:
            out["deny_list:layer_type"] = ", ".join(self.deny_layer_types)
        if self.deny_layer_names:
            out["deny_list:layer_name"] = ", ".join(self.deny_layer_names)
        if self.meta_arch_type is not None:
            out["object_detection:meta_arch_type"] = self.meta_arch_type
            out["object_detection:meta_layers_names_list"] = self.meta_layers_names_list
        if self.c7x_firmware_version is not None:
            out["advanced_options:c7x_firmware_version"] = self.c7x_firmware_version
        return out


def delegate_options(checked: Checked, extras: CompileExtras, tidl_tools_path: str,
                     artifacts_folder: str) -> dict[str, Any]:
    """The TIDL delegate options: what every format passes to TIDL for this model, device and benchmark release."""
    st = scale_type(checked.analysis, checked.device)
    # QAT v1: TIDL reads the ranges from the Clip nodes (accuracy_level 0); prequantized_model is for Q/DQ models only
    # (edgeai-benchmark's runtime_options_onnx_qat_v1 leaves it out)
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
        **extras.options(),
    }


@dataclass(frozen=True)
class Normalization:
    """``input_mean`` / ``input_scale`` for the benchmark's ``(pixel - mean) * scale`` and where they come from."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    derived: bool
    """True: read off the model's input quantizer; False: placeholders."""
    note: str


_MAX_CHANNELS = 64
"""More input channels than this is not an image: no per-channel mean/scale lists are written for it."""


def normalization(analysis: ModelAnalysis) -> Normalization:
    """Mean/scale that put pixels 0..255 exactly onto the input quantizer's 256 steps, or placeholders.

    A per-tensor QuantizeLinear with scale s and zero point z over an 8-bit type maps float x to round(x / s) + z.
    With mean m and scale s the benchmark feeds x = (p - m) * s, so q = p - m + z: uint8 (q in 0..255) needs m = z,
    int8 (q in -128..127) m = z + 128; then every pixel is one quantization step, nothing is clipped or rounded.
    """
    first = analysis.inputs[0] if analysis.inputs else None
    c = first.channels if first is not None else None
    if c is not None and not 1 <= c <= _MAX_CHANNELS:
        c = None  # not an image's channel count (a fuzzed dim of 2**31 made a list of 2**31 means)
    n = c or 3
    if first is not None and first.quant_range is not None and first.quant_dtype in ("uint8", "int8"):
        lo, hi = first.quant_range
        s = (hi - lo) / 255.0
        if s > 0:
            m = -lo / s
            mean = round(m, 6) + 0.0  # no -0.0
            return Normalization((mean,) * n, (float(f"{s:.9g}"),) * n, True,
                                 f"derived from the model's input quantizer ({first.quant_dtype} over "
                                 f"[{lo:.6g}, {hi:.6g}]): pixels 0..255 map onto its 256 steps")
    what = "the model's input is not quantized by a constant per-tensor QuantizeLinear"
    if c is None or c == 3:
        return Normalization(IMAGENET_MEAN, IMAGENET_SCALE, False,
                             f"placeholders (ImageNet): {what}; set the normalization the model was trained with")
    return Normalization((0.0,) * c, (1.0,) * c, False,
                         f"placeholders: {what}; set the normalization the model was trained with")
