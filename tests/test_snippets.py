"""Tests of tiexport.snippets and `tiexport snippet`: every output is parsed (ast, json, yaml) and its option values
checked per device and model kind; the generated edgeai-benchmark entry is also executed against a stand-in of
edgeai-benchmark's API (same function names and signatures as its configs use) to check what it passes."""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from fixtures.models import tiny_conv
from tiexport.cli import main
from tiexport.errors import UsageError
from tiexport.snippets import IncompatibleModelError, analyze_model, runtime_options, snippet

QUANT_FILE_KEY = "advanced_options:quant_params_proto_path"


# ------------------------------------------------------------------------------------------------ helpers
def undefined_names(source: str) -> set[str]:
    """Names a module loads that it neither imports, defines, binds as a parameter, nor gets from builtins.

    Scope-insensitive on purpose: generated snippets are flat, and the check is about names that exist nowhere.
    """
    tree = ast.parse(source)
    defined = set(dir(builtins)) | {"__file__"}  # a module's own global
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                defined.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
    return used - defined


def float_model() -> onnx.ModelProto:
    """A float Conv model: no Q/DQ at all."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], pads=[1, 1, 1, 1])], "float_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


P2 = tiny_conv()  # per-tensor symmetric power-of-2: the TDA4VM kind
PER_CHANNEL = tiny_conv(w_per_channel=True, w_p2=False)  # TI's v2 WC8 kind (TDA4VM: warnings, as TI's cl-6508)
NP2_PER_TENSOR = tiny_conv(w_p2=False, act_scale=0.05, in_scale=1 / 255)
ASYM_WEIGHT = tiny_conv(w_zp=2)  # an error on every TIDL device: weights are symmetric
ROOT = Path(__file__).resolve().parents[1]
QAT_V1 = ROOT / "fixtures" / "conformance" / "ti_v1" / "resnet_tiny_qat_v1.onnx"  # TI's own QAT v1 export


def _call(tree: ast.AST, attr: str) -> ast.Call:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == attr]
    assert len(calls) == 1, f"expected one call of .{attr}, found {len(calls)}"
    return calls[0]


def _kw(call: ast.Call, name: str) -> ast.expr:
    return next(k.value for k in call.keywords if k.arg == name)


# ---------------------------------------------------------------------------------- stand-in edgeai-benchmark
class _Settings:
    """The attributes of edgeai-benchmark's settings object the generated entry touches."""

    def __init__(self) -> None:
        self.dataset_cache: dict[str, dict[str, str]] = defaultdict(
            lambda: {"calibration_dataset": "calib", "input_dataset": "input"})

    def get_session_type(self, model_type: str) -> Any:
        assert model_type == "onnx"
        return lambda **kw: {"session_type": "onnxrt", **kw}

    @staticmethod
    def _runtime(scale_type: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        allowed = {"det_options", "ext_options", "min_options", "max_options", "fast_calibration"}
        unknown = [k for k in kwargs if k not in allowed and ":" not in k]
        assert not unknown, f"not a runtime_options_onnx_qat_v2 keyword: {unknown}"
        ext = kwargs.pop("ext_options", None) or {}
        # edgeai-benchmark applies ext_options last (r9.2 config_settings.py L90-94, r11.2 runtime_options.py L180-184)
        return {**kwargs, "advanced_options:quantization_scale_type": scale_type,
                "advanced_options:prequantized_model": 1, "accuracy_level": 0, **ext}

    def runtime_options_onnx_qat_v2(self, **kwargs: Any) -> dict[str, Any]:
        return self._runtime(4, kwargs)

    def runtime_options_onnx_qat_v2_p2(self, **kwargs: Any) -> dict[str, Any]:
        return self._runtime(1, kwargs)


def _fake_edgeai_benchmark() -> dict[str, types.ModuleType]:
    pkg = types.ModuleType("edgeai_benchmark")
    constants = types.ModuleType("edgeai_benchmark.constants")
    constants.MODEL_TYPE_ONNX = "onnx"  # type: ignore[attr-defined]
    constants.ADVANCED_OPTIONS_QUANT_FILE_KEY = QUANT_FILE_KEY  # type: ignore[attr-defined]
    constants.NCHW = "NCHW"  # type: ignore[attr-defined]
    datasets = types.ModuleType("edgeai_benchmark.datasets")
    for name in ("IMAGENET", "COCO", "ADE20K"):
        setattr(datasets, f"DATASET_CATEGORY_{name}", name.lower())
    utils = types.ModuleType("edgeai_benchmark.utils")
    utils.dict_update = lambda d, **kw: {**d, **kw}  # type: ignore[attr-defined]
    sessions = types.ModuleType("edgeai_benchmark.sessions")

    def get_onnx_session_cfg(settings: Any, work_dir: Any = None, input_optimization: bool = True,
                             input_data_layout: str = "NCHW", input_mean: Any = (123.675, 116.28, 103.53),
                             input_scale: Any = (0.017125, 0.017507, 0.017429), **kwargs: Any) -> dict[str, Any]:
        return dict(work_dir=work_dir, input_optimization=input_optimization, input_data_layout=input_data_layout,
                    input_mean=input_mean, input_scale=input_scale, tidl_offload=True, **kwargs)

    sessions.get_onnx_session_cfg = get_onnx_session_cfg  # type: ignore[attr-defined]
    preprocess = types.ModuleType("edgeai_benchmark.preprocess")

    class PreProcessTransforms:
        def __init__(self, settings: Any) -> None:
            self.settings = settings

        def get_transform_onnx(self, resize: Any = 256, crop: Any = 224, data_layout: str = "NCHW",
                               reverse_channels: bool = False, backend: str = "pil", interpolation: Any = None,
                               resize_with_pad: bool = False, add_flip_image: bool = False,
                               pad_color: Any = 0) -> dict[str, Any]:
            return {"resize": resize, "crop": crop}

    preprocess.PreProcessTransforms = PreProcessTransforms  # type: ignore[attr-defined]
    postprocess = types.ModuleType("edgeai_benchmark.postprocess")

    class PostProcessTransforms:
        def __init__(self, settings: Any) -> None:
            self.settings = settings

        def get_transform_classification(self) -> str:
            return "classification"

        def get_transform_detection_onnx(self, formatter: Any = None, **kwargs: Any) -> str:
            return "detection"

        def get_transform_segmentation_onnx(self, data_layout: str = "NCHW", with_argmax: bool = True) -> str:
            return "segmentation"

    postprocess.PostProcessTransforms = PostProcessTransforms  # type: ignore[attr-defined]
    mods = {"edgeai_benchmark": pkg}
    for m in (constants, datasets, utils, sessions, preprocess, postprocess):
        short = m.__name__.rsplit(".", 1)[1]
        setattr(pkg, short, m)
        mods[m.__name__] = m
    return mods


@pytest.fixture
def run_benchmark_entry(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Execute a generated benchmark file against the stand-in API; return its single pipeline config."""
    for name, mod in _fake_edgeai_benchmark().items():
        monkeypatch.setitem(sys.modules, name, mod)

    def run(source: str) -> tuple[str, dict[str, Any]]:
        namespace: dict[str, Any] = {"__file__": "/cfg/entry.py", "__name__": "entry"}
        exec(compile(source, "<benchmark snippet>", "exec"), namespace)
        configs = namespace["get_configs"](_Settings(), "work")
        assert len(configs) == 1
        return next(iter(configs.items()))

    return run


# ------------------------------------------------------------------------------------------------ the checker
def test_undefined_names_checker_flags_a_missing_name() -> None:
    assert undefined_names("import os\nx = os.sep\ndef f(a):\n    return a + y\n") == {"y"}


def test_undefined_names_checker_accepts_imports_params_and_builtins() -> None:
    assert undefined_names("from m import a as b\ndef f(c, *d, **e):\n    return len([b, c, d, e])\n") == set()


# ------------------------------------------------------------------------------------------------ analysis
def test_analysis_of_power_of_two_per_tensor_model() -> None:
    a = analyze_model(P2)
    assert (a.quantized, a.power_of_two, a.per_channel_weights, a.symmetric) == (True, True, False, True)
    assert a.format == "qdq"


def test_analysis_recognizes_ti_qat_v1() -> None:
    a = analyze_model(str(QAT_V1))
    assert (a.format, a.quantized, a.qat_v1_clips) == ("qat_v1", False, 11)
    assert a.describe().startswith("TIDL QAT v1 model (11 Clip nodes")


def test_analysis_of_per_channel_model() -> None:
    a = analyze_model(PER_CHANNEL)
    assert (a.power_of_two, a.per_channel_weights) == (False, True)


def test_analysis_of_asymmetric_activations() -> None:
    a = analyze_model(tiny_conv(act_zp=10))
    assert (a.symmetric, a.symmetric_weights) == (False, True)


def test_analysis_reads_input_name_shape_dtype_and_quant_range() -> None:
    (inp,) = analyze_model(P2).inputs
    assert (inp.name, inp.shape, inp.dtype, inp.quant_dtype) == ("input", (1, 3, 8, 8), "float", "uint8")
    assert inp.quant_range == (0.0, 255 * 2.0**-8)


def test_analysis_of_float_model() -> None:
    a = analyze_model(float_model())
    assert (a.quantized, a.power_of_two, a.qdq_nodes, a.format) == (False, False, 0, "float")


# ------------------------------------------------------------------------------------------------ option values
@pytest.mark.parametrize(("model", "device", "scale_type"), [
    (P2, "TDA4VM", 1),
    (P2, "AM68A", 4),  # the MMAv2 preset, which edgeai-benchmark's YAML loader applies over a config's own value
    (PER_CHANNEL, "AM68A", 4),
    (NP2_PER_TENSOR, "AM68A", 4),
    (PER_CHANNEL, "AM62A", 4),
    (PER_CHANNEL, "TDA4VM", 1),  # the YAML loader turns 4 into 1 on TDA4VM (r11.2 get_configs_from_file.py L106-108)
    (NP2_PER_TENSOR, "TDA4VM", 1),
])
def test_runtime_options_scale_type_follows_model_and_device(model: onnx.ModelProto, device: str,
                                                             scale_type: int) -> None:
    assert runtime_options(model, device)["advanced_options:quantization_scale_type"] == scale_type


def test_runtime_options_fixed_values_for_qdq_models() -> None:
    opts = runtime_options(P2, "AM68A", tidl_tools_path="/opt/tidl_tools", artifacts_folder="out")
    assert opts == {
        "tidl_tools_path": "/opt/tidl_tools",
        "artifacts_folder": "out",
        "tensor_bits": 8,
        "accuracy_level": 0,
        "debug_level": 0,
        "advanced_options:prequantized_model": 1,
        "advanced_options:quantization_scale_type": 4,
        QUANT_FILE_KEY: "",
        "advanced_options:pre_batchnorm_fold": 1,
        "advanced_options:add_data_convert_ops": 3,
    }


@pytest.mark.parametrize("device", ["TDA4VM", "AM68A"])
def test_runtime_options_of_ti_qat_v1_model(device: str) -> None:
    """edgeai-benchmark's runtime_options_onnx_qat_v1: accuracy_level 0 (is_qat), no prequantized_model (the ranges
    are the Clip nodes); the scale type is the device preset's, as for every model."""
    opts = runtime_options(str(QAT_V1), device, tidl_tools_path="/t", artifacts_folder="a")
    assert opts == {
        "tidl_tools_path": "/t", "artifacts_folder": "a", "tensor_bits": 8, "accuracy_level": 0, "debug_level": 0,
        "advanced_options:quantization_scale_type": 1 if device == "TDA4VM" else 4, QUANT_FILE_KEY: "",
        "advanced_options:pre_batchnorm_fold": 1, "advanced_options:add_data_convert_ops": 3,
    }


def test_benchmark_entry_of_ti_qat_v1_model_calls_the_v1_function() -> None:
    src = snippet(str(QAT_V1), "TDA4VM", "benchmark", model_path="m.onnx")
    assert undefined_names(src) == set()
    _call(ast.parse(src), "runtime_options_onnx_qat_v1")
    assert "runtime_options_onnx_qat_v2" not in src and "TIDL QAT v1" in src


# ------------------------------------------------------------------------------------------------ refusals
def test_per_channel_model_for_tda4vm_gets_the_p2_options_and_a_pointer_to_fix() -> None:
    """Warnings, not errors, on TDA4VM (TI deploys its per-channel affine cl-6508 there): scale type 1, what every
    edgeai-benchmark YAML and 11.x Python entry compiles with on TDA4VM, and a header that says what that does."""
    src = snippet(PER_CHANNEL, "TDA4VM", "benchmark", model_path="m.onnx")
    _call(ast.parse(src), "runtime_options_onnx_qat_v2_p2")
    assert "compatible_with_warnings" in src and "tiexport fix --device TDA4VM first" in src
    assert "compiled with power-of-2 scales" in src


def test_model_with_errors_refused_with_findings() -> None:
    with pytest.raises(IncompatibleModelError) as info:
        snippet(ASYM_WEIGHT, "TDA4VM", "benchmark")
    assert info.value.device == "TDA4VM"
    assert {f.rule_id for f in info.value.findings} == {"TIDL021"}
    assert "tiexport fix --device TDA4VM" in str(info.value)


@pytest.mark.parametrize("device", ["AM68A", "TDA4VM"])
def test_float_model_refused(device: str) -> None:
    with pytest.raises(IncompatibleModelError) as info:
        runtime_options(float_model(), device)
    assert "not_prequantized" in {f.category for f in info.value.findings}


def test_float_model_refused_on_am62_too() -> None:
    # validate's not-prequantized rule skips AM62 (no accelerator); the snippet must still refuse
    with pytest.raises(IncompatibleModelError) as info:
        snippet(float_model(), "AM62", "yaml")
    assert "not_prequantized" in {f.category for f in info.value.findings}


@pytest.mark.parametrize("fmt", ["tidl", "tidl-json"])
def test_am62_has_no_tidl_delegate_options(fmt: str) -> None:
    with pytest.raises(UsageError, match="no TIDL accelerator"):
        snippet(P2, "AM62", fmt)


def test_unknown_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown snippet format"):
        snippet(P2, "AM68A", "toml")


# ------------------------------------------------------------------------------------------------ benchmark
@pytest.mark.parametrize(("model", "device", "func"), [
    (P2, "TDA4VM", "runtime_options_onnx_qat_v2_p2"),
    (P2, "AM68A", "runtime_options_onnx_qat_v2"),
    (PER_CHANNEL, "AM68A", "runtime_options_onnx_qat_v2"),
    (NP2_PER_TENSOR, "AM69A", "runtime_options_onnx_qat_v2"),
])
def test_benchmark_entry_is_valid_python_calling_the_right_function(model: onnx.ModelProto, device: str,
                                                                     func: str) -> None:
    src = snippet(model, device, "benchmark", model_path="models/m.onnx", metrics={"accuracy_top1%": 72.5})
    tree = ast.parse(src)
    assert undefined_names(src) == set()
    call = _call(tree, func)
    assert isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
    assert call.func.value.id == "settings"
    assert [ast.unparse(k.value) for k in call.keywords if k.arg is None] == ["quant_params_proto_path_disable_option"]


def test_benchmark_entry_disables_quant_file_and_input_optimization() -> None:
    tree = ast.parse(snippet(P2, "AM68A", "benchmark"))
    disable = next(n for n in ast.walk(tree) if isinstance(n, ast.Dict) and n.keys
                   and isinstance(n.keys[0], ast.Attribute) and n.keys[0].attr == "ADVANCED_OPTIONS_QUANT_FILE_KEY")
    assert ast.unparse(disable) == "{constants.ADVANCED_OPTIONS_QUANT_FILE_KEY: ''}"
    session_cfg = _call(tree, "get_onnx_session_cfg")
    assert ast.literal_eval(_kw(session_cfg, "input_optimization")) is False


def test_benchmark_entry_carries_model_path_and_metric() -> None:
    tree = ast.parse(snippet(P2, "AM68A", "benchmark", model_path="models/m.onnx",
                             metrics={"accuracy_top1%": 72.5}))
    session = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                   and n.func.id == "onnx_session_type")
    # relative to the entry's own folder, not edgeai-benchmark's working folder
    assert ast.unparse(_kw(session, "model_path")) == "os.path.join(_HERE, 'models/m.onnx')"
    model_info = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                      and n.func.id == "dict" and n.keywords and n.keywords[0].arg == "metric_reference")
    assert ast.literal_eval(_kw(model_info, "metric_reference")) == {"accuracy_top1%": 72.5}
    # kept by edgeai-benchmark 11.x's default selection (model_shortlist: 100)
    assert ast.literal_eval(_kw(model_info, "model_shortlist")) <= 100


@pytest.mark.parametrize(("task", "post", "dataset"), [
    ("classification", "classification", "imagenet"),
    ("detection", "detection", "coco"),
    ("segmentation", "segmentation", "ade20k"),
])
def test_benchmark_entry_runs_against_the_benchmark_api(run_benchmark_entry: Any, task: str, post: str,
                                                        dataset: str) -> None:
    key, cfg = run_benchmark_entry(snippet(PER_CHANNEL, "AM68A", "benchmark", task=task, model_path="m.onnx"))
    assert key == {"classification": "cl", "detection": "od", "segmentation": "ss"}[task] + "-m"
    assert (cfg["task_type"], cfg["postprocess"], cfg["dataset_category"]) == (task, post, dataset)
    session = cfg["session"]
    assert session["model_path"] == "/cfg/m.onnx"
    assert session["input_optimization"] is False
    assert session["runtime_options"]["onnxruntime:graph_optimization_level"].name == "ORT_DISABLE_ALL"
    assert session["runtime_options"][QUANT_FILE_KEY] == ""
    assert session["runtime_options"]["advanced_options:quantization_scale_type"] == 4
    assert session["runtime_options"].get("det_options") is (True if task == "detection" else None)
    assert cfg["preprocess"]["crop"] == (8 if task == "classification" else (8, 8))


def test_benchmark_metric_defaults_to_task_key_placeholder(run_benchmark_entry: Any) -> None:
    _, cfg = run_benchmark_entry(snippet(P2, "TDA4VM", "benchmark", task="segmentation"))
    assert cfg["model_info"] == {"metric_reference": {"accuracy_mean_iou%": None}, "model_shortlist": 10}


def test_benchmark_header_with_quotes_and_backslashes_in_model_name_still_parses() -> None:
    m = tiny_conv()
    m.graph.name = 'a"""b\\c'
    src = snippet(m, "AM68A", "benchmark")
    assert undefined_names(src) == set()
    assert 'a"""b\\c' in ast.get_docstring(ast.parse(src))  # type: ignore[operator]


def test_benchmark_entry_generated_for_am62(run_benchmark_entry: Any) -> None:
    _, cfg = run_benchmark_entry(snippet(P2, "AM62", "benchmark"))
    assert cfg["session"]["runtime_options"][QUANT_FILE_KEY] == ""


# ------------------------------------------------------------------------------------------------ tidl
def test_tidl_python_defines_the_same_options_as_runtime_options(monkeypatch: pytest.MonkeyPatch) -> None:
    src = snippet(PER_CHANNEL, "AM68A", "tidl", model_path="m.onnx", artifacts_folder="art")
    assert undefined_names(src) == set()
    monkeypatch.setenv("TIDL_TOOLS_PATH", "/opt/tidl")
    namespace: dict[str, Any] = {}
    exec(compile(src, "<tidl snippet>", "exec"), namespace)  # imports the real onnxruntime; no session is made
    assert namespace["delegate_options"] == runtime_options(PER_CHANNEL, "AM68A", tidl_tools_path="/opt/tidl",
                                                                  artifacts_folder="art")
    assert namespace["model_path"] == "m.onnx"


def test_tidl_python_uses_given_tools_path_literal() -> None:
    tree = ast.parse(snippet(P2, "TDA4VM", "tidl", tidl_tools_path="/x/tools"))
    assign = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "delegate_options")
    opts = ast.literal_eval(assign.value)
    assert opts["tidl_tools_path"] == "/x/tools"
    assert opts["advanced_options:quantization_scale_type"] == 1


@pytest.mark.parametrize(("model", "device", "scale_type"), [(P2, "TDA4VM", 1), (PER_CHANNEL, "AM68A", 4)])
def test_tidl_json(model: onnx.ModelProto, device: str, scale_type: int) -> None:
    opts = json.loads(snippet(model, device, "tidl-json"))
    assert opts == runtime_options(model, device)
    assert (opts["advanced_options:quantization_scale_type"], opts["tensor_bits"], opts["accuracy_level"],
            opts["advanced_options:prequantized_model"], opts["debug_level"]) == (scale_type, 8, 0, 1, 0)


# ------------------------------------------------------------------------------------------------ yaml
def test_yaml_session_and_runtime_options() -> None:
    """The keys edgeai-benchmark's YAML loader reads (11.x: calibration_dataset/input_dataset/dataset_category at the
    top; 9.2: preprocess interpolation and pad_color) and TI's files carry (model_id, output_details, num_inputs,
    model_info.model_shortlist)."""
    doc = yaml.safe_load(snippet(PER_CHANNEL, "AM68A", "yaml", model_path="m.onnx", benchmark_version="11.2"))
    s = doc["session"]
    assert (doc["task_type"], s["session_name"], s["model_path"], s["model_id"]) == (
        "classification", "onnxrt", "m.onnx", "cl-m")
    assert (doc["dataset_category"], doc["calibration_dataset"], doc["input_dataset"]) == ("imagenet",) * 3
    assert {"interpolation", "pad_color", "resize_with_pad", "backend"} <= set(doc["preprocess"])
    assert s["input_optimization"] is False and s["num_inputs"] == 1 and s["output_details"] is None
    assert s["runtime_options"] == {k: v for k, v in runtime_options(PER_CHANNEL, "AM68A").items()
                                    if k not in ("tidl_tools_path", "artifacts_folder")}
    assert doc["model_info"]["model_shortlist"] <= 100
    assert len(s["input_mean"]) == len(s["input_scale"]) == 3


def test_yaml_for_benchmark_92_carries_the_prequantized_model_type() -> None:
    """9.2 and 10.0 read session.runtime_options.info.prequantized_model_type (r9.2 get_configs_from_file.py L63)."""
    rt = yaml.safe_load(snippet(PER_CHANNEL, "AM68A", "yaml", benchmark_version="9.2"))["session"]["runtime_options"]
    assert rt["info"] == {"prequantized_model_type": 2}
    rt = yaml.safe_load(snippet(PER_CHANNEL, "AM68A", "yaml", benchmark_version="11.x"))["session"]["runtime_options"]
    assert "info" not in rt


def test_yaml_input_and_preprocess_come_from_the_model() -> None:
    doc = yaml.safe_load(snippet(tiny_conv(size=16), "TDA4VM", "yaml", task="segmentation"))
    # a list of name/shape/type as edgeai-benchmark writes it (not one dict)
    assert doc["session"]["input_details"] == [{"name": "input", "shape": [1, 3, 16, 16], "type": "tensor(float)"}]
    assert (doc["preprocess"]["resize"], doc["preprocess"]["crop"]) == ([16, 16], [16, 16])
    assert doc["postprocess"] == {"data_layout": "NCHW", "with_argmax": True}


def test_yaml_metric_values_round_trip() -> None:
    metrics = {"accuracy_top1%": 1e-05, "note": "yes", "a:b": 'say "hi"', "n": 3}
    doc = yaml.safe_load(snippet(P2, "AM68A", "yaml", metrics=metrics))
    assert doc["model_info"]["metric_reference"] == metrics


def test_yaml_for_am62_runs_on_arm() -> None:
    s = yaml.safe_load(snippet(P2, "AM62", "yaml", benchmark_version="11.0"))["session"]
    assert (s["runtime_options"], s["tidl_offload"]) == ({}, False)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, m in {"p2": P2, "pc": PER_CHANNEL, "asym_w": ASYM_WEIGHT, "float": float_model()}.items():
        out[name] = tmp_path / f"{name}.onnx"
        onnx.save(m, out[name])
    return out


def test_cli_writes_yaml_with_metrics(model_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cfg.yaml"
    rc = main(["snippet", str(model_files["pc"]), "--device", "AM68A", "--format", "yaml", "--task", "detection",
               "--metric", "accuracy_ap[.5:.95]%=31.5", "--metric", "note=qat", "--output", str(out)])
    assert rc == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["model_info"]["metric_reference"] == {"accuracy_ap[.5:.95]%": 31.5, "note": "qat"}
    assert doc["session"]["model_path"] == str(model_files["pc"])
    assert doc["session"]["runtime_options"]["advanced_options:quantization_scale_type"] == 4


def test_cli_benchmark_to_stdout_is_python(model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snippet", str(model_files["p2"]), "-d", "TDA4VM", "--model-path", "zoo/p2.onnx"]) == 0
    src = capsys.readouterr().out
    assert undefined_names(src) == set()
    assert "runtime_options_onnx_qat_v2_p2(" in src and "'zoo/p2.onnx'" in src


def test_cli_incompatible_model_prints_findings_and_fix_pointer(model_files: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["snippet", str(model_files["asym_w"]), "--device", "TDA4VM", "--format", "tidl"])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.out == ""
    assert "TIDL021" in captured.err and "tiexport fix --device TDA4VM" in captured.err


def test_cli_float_model_exits_1(model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snippet", str(model_files["float"]), "--device", "AM68A", "--format", "tidl-json"]) == 1
    assert "TIDL010" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["snippet", "missing.onnx", "--device", "AM68A"],
    ["snippet", "{p2}", "--device", "AM68A", "--metric", "no_equals_sign"],
    ["snippet", "{p2}", "--device", "AM62", "--format", "tidl"],
    ["snippet", "{p2}", "--device", "NOPE"],
    ["snippet", "{p2}", "--device", "AM68A", "--output", "{p2}"],
])
def test_cli_unusable_input_exits_2_with_one_line(model_files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                  args: list[str]) -> None:
    before = model_files["p2"].read_bytes()
    rc = main([a.format(p2=model_files["p2"]) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert model_files["p2"].read_bytes() == before


def test_snippets_import_without_torch() -> None:
    code = ("import sys, tiexport\nfrom tiexport import snippet, runtime_options\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ------------------------------------------------------------------------------------------------ issue 17
def test_input_normalization_comes_from_the_input_quantizer() -> None:
    """uint8 input quantizer with scale s, zero point z: mean z, scale s (pixels land on its 256 steps exactly)."""
    doc = yaml.safe_load(snippet(P2, "AM68A", "yaml"))
    q = analyze_model(P2).inputs[0]
    assert q.quant_dtype == "uint8" and q.quant_range is not None
    s = (q.quant_range[1] - q.quant_range[0]) / 255
    assert doc["session"]["input_scale"] == pytest.approx([s] * 3)
    assert doc["session"]["input_mean"] == pytest.approx([-q.quant_range[0] / s] * 3)
    assert "derived from the model's input quantizer" in snippet(P2, "AM68A", "benchmark")


def test_unquantized_input_keeps_placeholders_and_says_so() -> None:
    src = snippet(str(QAT_V1), "TDA4VM", "yaml")
    assert "placeholders (ImageNet)" in src
    assert yaml.safe_load(src)["session"]["input_mean"] == [123.675, 116.28, 103.53]


@pytest.mark.parametrize("device", ["TDA4VM", "AM68A"])
@pytest.mark.parametrize("version", ["9.2", "10.1", "11.2"])
def test_all_formats_state_the_same_options(run_benchmark_entry: Any, device: str, version: str) -> None:
    extras = {"deny_layer_types": ["Softmax"], "deny_layer_names": "conv1, conv2"}
    ref = runtime_options(P2, device, benchmark_version=version, **extras)  # type: ignore[arg-type]
    ref = {k: v for k, v in ref.items() if k not in ("tidl_tools_path", "artifacts_folder")}
    assert ref["deny_list:layer_type"] == "Softmax" and ref["deny_list:layer_name"] == "conv1, conv2"
    for fmt in ("yaml", "tidlrunner"):
        rt = yaml.safe_load(snippet(P2, device, fmt, benchmark_version=version, **extras))["session"]["runtime_options"]
        rt.pop("info", None)
        if fmt == "tidlrunner":  # a list there: tidlrunner joins it with ", " (runner/common/pipelines/compile.py)
            assert rt["deny_list:layer_type"] == ["Softmax"]
            rt["deny_list:layer_type"] = ", ".join(rt["deny_list:layer_type"])
        assert rt == ref, fmt
    _, cfg = run_benchmark_entry(snippet(P2, device, "benchmark", benchmark_version=version, **extras))
    got = cfg["session"]["runtime_options"]
    assert {k: got[k] for k in ref if k in got} == {k: v for k, v in ref.items() if k in got}
    assert got["advanced_options:quantization_scale_type"] == ref["advanced_options:quantization_scale_type"]


def test_detection_meta_architecture_options() -> None:
    opts = runtime_options(P2, "AM68A", meta_arch_type=6, meta_layers_names_list="yolox.prototxt")
    assert (opts["object_detection:meta_arch_type"], opts["object_detection:meta_layers_names_list"]) == (
        6, "yolox.prototxt")
    with pytest.raises(UsageError, match="both"):
        runtime_options(P2, "AM68A", meta_arch_type=6)
    with pytest.raises(UsageError, match="meta_arch_type"):
        runtime_options(P2, "AM68A", meta_arch_type=1, meta_layers_names_list="x.prototxt")
    with pytest.raises(UsageError, match="task detection"):
        snippet(P2, "AM68A", "yaml", task="segmentation", meta_arch_type=6, meta_layers_names_list="x.prototxt")


def test_c7x_firmware_version_checked_against_the_sdk() -> None:
    opts = runtime_options(P2, "AM68A", sdk="10.1", c7x_firmware_version="10_01_04_00")
    assert opts["advanced_options:c7x_firmware_version"] == "10_01_04_00"
    with pytest.raises(UsageError, match="release line"):
        runtime_options(P2, "AM68A", sdk="11.0", c7x_firmware_version="10_01_04_00")
    with pytest.raises(UsageError, match=r"from TIDL SDK 10\.0"):
        runtime_options(P2, "AM68A", sdk="9.2", c7x_firmware_version="09_02_00_00")
    with pytest.raises(UsageError, match="look like"):
        runtime_options(P2, "AM68A", c7x_firmware_version="11.0")


def test_benchmark_version_shapes_the_run_instructions() -> None:
    src11 = snippet(P2, "AM68A", "benchmark", benchmark_version="11.x")
    assert "external_models_path" in src11 and "model_shortlist: 100" in src11
    src92 = snippet(P2, "AM68A", "benchmark", benchmark_version="9.2")
    assert "external_models_path" not in src92 and "datasets.get_datasets(settings)" in src92
    assert "--configs_path" in src92
    with pytest.raises(UsageError, match="unknown edgeai-benchmark version"):
        snippet(P2, "AM68A", "benchmark", benchmark_version="8.6")


def test_tidlrunner_config_names_its_blocks() -> None:
    doc = yaml.safe_load(snippet(P2, "AM68A", "tidlrunner", task="segmentation"))
    assert doc["preprocess"]["name"] == "image_preprocess"
    assert doc["postprocess"]["name"] == "segmentation_postprocess"
    assert "info" not in doc["session"]["runtime_options"]


def test_tidl_python_imports_without_tidl_tools_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIDL_TOOLS_PATH", raising=False)
    namespace: dict[str, Any] = {}
    exec(compile(snippet(P2, "AM68A", "tidl"), "<tidl snippet>", "exec"), namespace)  # no KeyError at import
    with pytest.raises(RuntimeError, match="TIDL_TOOLS_PATH"):
        namespace["make_session"]()


def test_cli_new_flags(model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snippet", str(model_files["p2"]), "-d", "AM68A", "-f", "tidl-json", "--deny-layer-type", "Softmax",
                 "--benchmark-version", "10.1", "--task", "detection", "--meta-arch-type", "6",
                 "--meta-layers-names-list", "m.prototxt"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["deny_list:layer_type"] == "Softmax" and "envsubst" in err
    assert main(["snippet", str(model_files["p2"]), "-d", "AM68A", "--c7x-firmware-version", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_detection_entry_carries_the_meta_architecture(run_benchmark_entry: Any) -> None:
    src = snippet(P2, "AM68A", "benchmark", task="detection", meta_arch_type=6, meta_layers_names_list="m.prototxt")
    _, cfg = run_benchmark_entry(src)
    rt = cfg["session"]["runtime_options"]
    assert rt["object_detection:meta_arch_type"] == 6 and rt["det_options"] is True
    assert rt["object_detection:meta_layers_names_list"] == "/cfg/m.prototxt"  # beside the entry, as model_path
    doc = yaml.safe_load(snippet(P2, "AM68A", "yaml", task="detection", meta_arch_type=6,
                                 meta_layers_names_list="m.prototxt"))
    assert doc["session"]["runtime_options"]["object_detection:meta_layers_names_list"] == "m.prototxt"
    assert doc["dataset_category"] == "coco" and doc["postprocess"]["normalized_detections"] is True


@pytest.mark.parametrize(("version", "fmt", "said"), [
    ("9.2", "yaml", "joins it to this file's folder"),  # 9.2/10.0 keep the config's folder for a single file
    ("11.2", "yaml", "resolves against edgeai-benchmark's working folder"),  # 10.1+: only in an aggregate list
    ("11.2", "tidlrunner", "edgeai-tidlrunner joins it to this file's folder"),
])
def test_yaml_says_where_a_relative_model_path_resolves(version: str, fmt: str, said: str) -> None:
    assert said in snippet(P2, "AM68A", fmt, model_path="m.onnx", benchmark_version=version)
    assert "model_path" not in snippet(P2, "AM68A", fmt, model_path="/abs/m.onnx").split("ORT_DISABLE_ALL")[0]


def test_int8_input_quantizer_centres_the_pixels() -> None:
    """int8 with zero point 0 and scale s: mean 128, scale s (q = pixel - 128 spans -128..127)."""
    m = tiny_conv(in_dtype="int8", in_scale=2.0**-7)
    session = yaml.safe_load(snippet(m, "AM68A", "yaml"))["session"]
    assert session["input_mean"] == pytest.approx([128.0] * 3)
    assert session["input_scale"] == pytest.approx([2.0**-7] * 3)
