"""Where TIDL's facts are written: citations of TI's public documents (and of the ONNX specification).

A :class:`DocRef` names a repository, a branch or commit, a file and a line (or a section, for files read from a
search index without line numbers), and renders as ``owner/repo@ref:path#Lline``. The constants below are the
documents the rules rest on; each comment says what the cited place states. The branches are edgeai-tidl-tools
release branches (``rel_09_02`` ... ``rel_11_00``; ``rel_11_00`` is the commit
95ba2c7ec62bbedeb637d7a5c0273fcede21cac9, tag 11_00_06_00). ``b3a7c2c5`` is the edgeai-tidl-tools commit of the
11.2-era ``docs/quantization.md``, the first to hold TIDL's per-layer quantization table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BENCHMARK_BIAS_16BIT",
    "BENCHMARK_EXTERNAL_MODELS",
    "BENCHMARK_EXT_OPTIONS_LAST",
    "BENCHMARK_EXT_OPTIONS_LAST_92",
    "BENCHMARK_MODEL_SHORTLIST",
    "BENCHMARK_ORT_GRAPH_OPT",
    "BENCHMARK_PRESETS",
    "BENCHMARK_PRESET_AFTER_FUNCTION",
    "BENCHMARK_QAT_V1",
    "BENCHMARK_QAT_V1_CONFIG",
    "BENCHMARK_YAML_INFO_92",
    "BENCHMARK_YAML_PRESET",
    "BENCHMARK_YAML_PRESET_92",
    "DEVICE_FEATURES",
    "LAYER_QUANT_TABLE",
    "MODELZOO_QAT_V1",
    "MODELZOO_TDA4VM_QAT_V2",
    "OD_META_ARCH_TYPES",
    "ONNX_IR_SPEC",
    "ONNX_QDQ_SPEC",
    "OPS_DOC",
    "OPTIMIZER_BIAS_QDQ",
    "OPTIMIZER_FOLD_WEIGHTS",
    "OSRT_C7X_FIRMWARE",
    "OSRT_DENY_LIST",
    "OSRT_INFER_SHAPES",
    "OSRT_MAX_SUBGRAPHS",
    "OSRT_MAX_SUBGRAPH_NODES",
    "OSRT_OD_META",
    "OSRT_PREQUANTIZED",
    "OSRT_SCALE_TYPE",
    "QAT_V1_DOC",
    "QUANT_8BIT_ONLY",
    "QUANT_ASYMMETRIC",
    "QUANT_PREQUANTIZED_QDQ",
    "TDA4VM_P2_TORCHMODELOPT",
    "TIDLRUNNER_DENY_LIST",
    "TIDLRUNNER_UPGRADE_CFG",
    "TOOLS_REPO",
    "DocRef",
]

TOOLS_REPO = "TexasInstruments/edgeai-tidl-tools"
TENSORLAB_REPO = "TexasInstruments/edgeai-tensorlab"
OPS_DOC = "docs/supported_ops_rts_versions.md"


@dataclass(frozen=True)
class DocRef:
    """One place in a public document."""

    repo: str
    ref: str
    path: str
    line: int | None = None
    section: str = ""

    def cite(self) -> str:
        where = f"#L{self.line}" if self.line else (f" §{self.section}" if self.section else "")
        return f"{self.repo}@{self.ref}:{self.path}{where}"

    def __str__(self) -> str:
        return self.cite()


def _tt(path: str, line: int | None = None, ref: str = "rel_11_00", section: str = "") -> str:
    return DocRef(TOOLS_REPO, ref, path, line, section).cite()


# ONNX itself: what a well-formed model is (TIDL reads models with ONNX / ONNX Runtime, OPS_DOC "Supported model
# formats & operator versions").
ONNX_IR_SPEC = "onnx/onnx@main:docs/IR.md (graphs: single static assignment, topologically sorted)"
ONNX_QDQ_SPEC = "onnx/onnx@main:docs/Operators.md#QuantizeLinear (scale/zero-point types and shapes, axis)"

# docs/tidl_fsg_quantization.md, the same line in rel_09_02 .. rel_11_00:
QUANT_PREQUANTIZED_QDQ = _tt("docs/tidl_fsg_quantization.md", 55)  # QDQ models need prequantized_model = 1
QUANT_8BIT_ONLY = _tt("docs/tidl_fsg_quantization.md", 59)  # pre-quantized ONNX/TFLite: 8-bit only
QUANT_ASYMMETRIC = _tt("docs/tidl_fsg_quantization.md", 48)  # asymmetric: all devices except TDA4VM/AM68PA
QAT_V1_DOC = _tt("docs/tidl_fsg_quantization.md", 123)  # "QAT [TDA4VM specific]": ranges as Clip/PACT/ReLU6 nodes

# docs/supported_ops_rts_versions.md "Feature set comparison across devices": "Support for Asymmetric, Per Channel
# Quantization" is not available on AM68PA (TDA4VM).
DEVICE_FEATURES = _tt(OPS_DOC, 145)

# examples/osrt_python/common_utils.py: TI's compile examples run onnx.shape_inference on every ONNX model.
OSRT_INFER_SHAPES = _tt("examples/osrt_python/common_utils.py", 303)

# examples/osrt_python/README.md option table:
OSRT_MAX_SUBGRAPHS = _tt("examples/osrt_python/README.md", 124)  # <= 16, default 16, "rest delegated to ARM"
OSRT_SCALE_TYPE = _tt("examples/osrt_python/README.md", 195)  # quantization_scale_type 0 / 1 / 3 / 4
OSRT_PREQUANTIZED = _tt("examples/osrt_python/README.md", 197)  # prequantized_model reads QDQ scales
OSRT_MAX_SUBGRAPH_NODES = _tt("examples/osrt_python/README.md", 211)  # default 864; larger subgraphs are divided

# The 11.2-era docs/quantization.md, "TIDL Layer Quantization Restrictions" (per-layer activations / weights / biases
# and "Requires QDQ Nodes"; notes: symmetric per-tensor network input, layers that need no own Q/DQ).
LAYER_QUANT_TABLE = _tt("docs/quantization.md", ref="b3a7c2c5", section="TIDL Layer Quantization Restrictions")

# TI's model optimizer writes Conv/Gemm bias as int32 at scale s_in * s_w (rule add_bias_qdq, off by default), and
# folds float weights behind a QuantizeLinear into 8-bit initializers (rule remove_quantize_initializer, on by default).
OPTIMIZER_BIAS_QDQ = _tt("osrt-model-tools/osrt_model_tools/onnx_tools/tidl_onnx_model_optimizer/src/qdq.py", 82)
OPTIMIZER_FOLD_WEIGHTS = _tt("osrt-model-tools/osrt_model_tools/onnx_tools/tidl_onnx_model_optimizer/README.md", 66)

# edgeai-tensorlab (r11.0): torchmodelopt's quantization README (TDA4VM: per-tensor power-of-2 quantization) and
# edgeai-benchmark's device presets (TDA4VM: quantization_scale_type 1, applied after a config's own options).
TDA4VM_P2_TORCHMODELOPT = DocRef(
    TENSORLAB_REPO, "r11.0",
    "edgeai-modeloptimization/torchmodelopt/edgeai_torchmodelopt/xmodelopt/quantization/README.md", 5).cite()
BENCHMARK_PRESETS = DocRef(TENSORLAB_REPO, "r11.0", "edgeai-benchmark/edgeai_benchmark/core/presets.py", 84).cite()
# edgeai-benchmark's common runtime options: "bias_clipping ... 0 (default), weight scale will be adjusted to avoid
# bias_clipping ... the mode where the bias is clipped to 16bits (default in TDA4VM)" (L121-123).
BENCHMARK_BIAS_16BIT = DocRef(TENSORLAB_REPO, "r11.0", "edgeai-benchmark/edgeai_benchmark/core/runtime_options.py",
                              123).cite()
BENCHMARK_QAT_V1 = DocRef(TENSORLAB_REPO, "r11.0", "edgeai-benchmark/edgeai_benchmark/core/runtime_options.py",
                          None, "runtime_options_onnx_qat_v1").cite()
# edgeai-benchmark's own QAT v1 model configs (cl-6098 mobilenet_v2_tv_qat-p2 and others) use
# runtime_options_onnx_qat_v1 for every device, and the model zoo ships cl-6098 artifacts for TDA4VM, AM67A, AM68A and
# AM69A (modelartifacts/<device>/8bits/artifacts.csv line 17).
BENCHMARK_QAT_V1_CONFIG = DocRef(TENSORLAB_REPO, "r11.0", "edgeai-benchmark/configs/classification.py", 146).cite()
MODELZOO_QAT_V1 = DocRef(TENSORLAB_REPO, "r11.0", "edgeai-modelzoo/modelartifacts/AM68A/8bits/artifacts.csv", 17).cite()
# The model zoo deploys the per-channel, affine QAT v2 model cl-6508 on TDA4VM (artifact link in TDA4VM/8bits).
MODELZOO_TDA4VM_QAT_V2 = DocRef(
    TENSORLAB_REPO, "r11.0", "edgeai-modelzoo/modelartifacts/TDA4VM/8bits/artifacts.csv", 28).cite()

# edgeai-benchmark, what a generated config entry must fit (tiexport.snippets; checked by running these branches in
# bench/conformance_snippets.py). 11.x: the device preset (settings.runtime_options) is applied after a runtime-options
# function's own values, then ext_options last; the YAML loader applies the preset after the config's options and turns
# scale type 4 into 1 on TDA4VM (9.2 the same); default settings keep only entries with model_info.model_shortlist;
# one extra Python config file through settings.external_models_path; 'onnxruntime:graph_optimization_level' in the
# runtime options sets the ONNX Runtime session's level.
_EB = "TexasInstruments/edgeai-benchmark"


def _eb11(path: str, line: int) -> str:
    return DocRef(TENSORLAB_REPO, "r11.2", f"edgeai-benchmark/{path}", line).cite()


BENCHMARK_PRESET_AFTER_FUNCTION = _eb11("edgeai_benchmark/core/runtime_options.py", 178)
BENCHMARK_EXT_OPTIONS_LAST = _eb11("edgeai_benchmark/core/runtime_options.py", 184)
BENCHMARK_EXT_OPTIONS_LAST_92 = DocRef(_EB, "r9.2", "edgeai_benchmark/config_settings.py", 94).cite()
BENCHMARK_YAML_PRESET = _eb11("edgeai_benchmark/interfaces/get_configs_from_file.py", 104)
BENCHMARK_YAML_PRESET_92 = DocRef(_EB, "r9.2", "edgeai_benchmark/interfaces/get_configs_from_file.py", 77).cite()
BENCHMARK_YAML_INFO_92 = DocRef(_EB, "r9.2", "edgeai_benchmark/interfaces/get_configs_from_file.py", 63).cite()
BENCHMARK_MODEL_SHORTLIST = _eb11("edgeai_benchmark/pipelines/pipeline_runner.py", 377)
BENCHMARK_EXTERNAL_MODELS = _eb11("configs/__init__.py", 96)
BENCHMARK_ORT_GRAPH_OPT = _eb11("edgeai_benchmark/core/onnxrt_runtime.py", 108)

# The TIDL delegate options a user adds (examples/osrt_python/README.md option table): deny_list:layer_type /
# deny_list:layer_name (comma-separated strings), object_detection:meta_layers_names_list / meta_arch_type, and
# advanced_options:c7x_firmware_version (from rel_10_00 on); the meta-architecture types of ONNX detection models.
OSRT_DENY_LIST = _tt("examples/osrt_python/README.md", 132)
OSRT_OD_META = _tt("examples/osrt_python/README.md", 155)
OSRT_C7X_FIRMWARE = _tt("examples/osrt_python/README.md", 201, ref="rel_10_00")
OD_META_ARCH_TYPES = _tt("docs/tidl_fsg_od_meta_arch.md", 27)

# edgeai-tidlrunner (main = 11.2.1, fe6ffe1): its config upgrade maps TI's model-zoo YAML keys onto its own
# (session_name -> session.name, input_dataset -> common.input_dataset), and it joins deny_list:layer_type (a list).
_TR_RUNNER = "tidlrunner/edgeai_tidlrunner/runner/common/pipelines"
TIDLRUNNER_UPGRADE_CFG = DocRef("TexasInstruments/edgeai-tidlrunner", "main", f"{_TR_RUNNER}/common_/upgrade_cfg.py",
                                63).cite()
TIDLRUNNER_DENY_LIST = DocRef("TexasInstruments/edgeai-tidlrunner", "main", f"{_TR_RUNNER}/compile.py", 67).cite()
