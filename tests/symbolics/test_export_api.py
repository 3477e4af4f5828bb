"""``tiexport.export`` as a user calls it: arguments, errors, metadata, names, opsets and static shapes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402

import tiexport  # noqa: E402
from tests.symbolics.helpers import quiet  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402
from tiexport.symbolics.export import ExportError  # noqa: E402

SHAPE = (1, 3, 8, 8)
EXPORTERS = ["torchscript", pytest.param("dynamo", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxscript") is None, reason="onnxscript not installed"))]


def _qat() -> torch.nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with quiet():
        prepared = prepare_qat_fx(model.train(), tq.get_default_qat_qconfig_mapping("qnnpack"), (torch.rand(SHAPE),))
        prepared(torch.rand(SHAPE))
    return prepared.eval()


@pytest.fixture(scope="module")
def qat_model():
    return _qat()


def _load(path) -> onnx.ModelProto:
    return onnx.load(str(path))


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"exporter": "onnx"}, "exporter must be one of"),
    ({"opset_version": 12}, "opset_version"),
    ({"exporter": "torchscript", "opset_version": 21}, "dynamo"),
    ({"custom_translation_table": {"a": "b"}}, "dynamo"),
])
def test_bad_arguments_are_usage_errors(tmp_path, qat_model, kwargs, match):
    with pytest.raises(UsageError, match=match):
        tiexport.export(qat_model, torch.rand(SHAPE), tmp_path / "m.onnx", **kwargs)


@pytest.mark.parametrize(("inputs", "match"), [
    ((), "non-empty"),
    (("not a tensor",), "not a tensor"),
    (torch.rand(0, 3, 8, 8), "dimension"),
])
def test_bad_example_inputs_are_usage_errors(tmp_path, qat_model, inputs, match):
    with pytest.raises(UsageError, match=match):
        tiexport.export(qat_model, inputs, tmp_path / "m.onnx")


def test_a_missing_output_folder_is_a_usage_error(tmp_path, qat_model):
    with pytest.raises(UsageError, match="does not exist"):
        tiexport.export(qat_model, torch.rand(SHAPE), tmp_path / "missing" / "m.onnx")


def test_inputs_the_model_cannot_run_are_a_usage_error(tmp_path, qat_model):
    with pytest.raises(UsageError, match="does not run"):
        tiexport.export(qat_model, torch.rand(1, 5, 8, 8), tmp_path / "m.onnx")


def test_something_other_than_a_module_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"torch\.nn\.Module"):
        tiexport.export(lambda x: x, torch.rand(SHAPE), tmp_path / "m.onnx")


@torch.library.custom_op("tiexport_tests::no_symbolic", mutates_args=())
def _no_symbolic(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_no_symbolic.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Untranslatable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tiexport_tests.no_symbolic(x)


def test_an_exporter_failure_is_an_export_error_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="torchscript exporter failed"):
        tiexport.export(_Untranslatable(), torch.rand(SHAPE), tmp_path / "m.onnx", exporter="torchscript")
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------------ output


@pytest.fixture(scope="module")
def default_exports(qat_model, tmp_path_factory):
    """One default export per exporter, shared by the tests that only read the result."""
    folder = tmp_path_factory.mktemp("default_exports")
    out = {}
    for exporter in ("torchscript", "dynamo"):
        if exporter == "dynamo" and __import__("importlib").util.find_spec("onnxscript") is None:
            continue
        path = folder / f"{exporter}.onnx"
        out[exporter] = (tiexport.export(qat_model, torch.rand(SHAPE), path, exporter=exporter), _load(path))
    return out


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_default_is_opset_17_ir_8_with_static_input_shape(default_exports, exporter):
    _, model = default_exports[exporter]
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert (opset, model.ir_version, dims) == (17, 8, list(SHAPE))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_names_default_to_forward_arguments_and_output(default_exports, exporter):
    result, model = default_exports[exporter]
    assert [i.name for i in model.graph.input] == ["input"] == list(result.input_names)
    assert [o.name for o in model.graph.output] == ["output"] == list(result.output_names)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_opset_18_is_available(tmp_path, qat_model, exporter):
    tiexport.export(qat_model, torch.rand(SHAPE), tmp_path / "m.onnx", opset_version=18, exporter=exporter)
    model = _load(tmp_path / "m.onnx")
    assert next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 18
    onnx.checker.check_model(model, full_check=True)


def test_given_names_are_used(tmp_path, qat_model):
    tiexport.export(qat_model, torch.rand(SHAPE), tmp_path / "m.onnx", input_names=["image"],
                    output_names=["logits"])
    model = _load(tmp_path / "m.onnx")
    assert ([i.name for i in model.graph.input], [o.name for o in model.graph.output]) == (["image"], ["logits"])


def test_metadata_names_tiexport_the_exporter_and_the_callers_keys(tmp_path, qat_model):
    tiexport.export(qat_model, torch.rand(SHAPE), tmp_path / "m.onnx", metadata={"dataset": "digits"})
    model = _load(tmp_path / "m.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    assert (model.producer_name, model.producer_version) == ("tiexport", tiexport.__version__)
    assert props["tiexport_version"] == tiexport.__version__ and props["exporter"] == "torchscript"
    assert props["dataset"] == "digits" and props["torch_version"] == torch.__version__


def test_metadata_carries_the_qconfig_type_the_model_names(tmp_path):
    model = _qat()
    model._tiexport_qconfig_type = "WC8_AT8"
    tiexport.export(model, torch.rand(SHAPE), tmp_path / "m.onnx")
    props = {p.key: p.value for p in _load(tmp_path / "m.onnx").metadata_props}
    assert props["qconfig_type"] == "WC8_AT8"


def test_metadata_has_no_qconfig_type_when_the_model_names_none(default_exports):
    _, model = default_exports["torchscript"]
    assert "qconfig_type" not in {p.key for p in model.metadata_props}


def test_exported_model_carries_no_exporter_node_metadata(default_exports):
    if "dynamo" not in default_exports:
        pytest.skip("onnxscript not installed")
    _, model = default_exports["dynamo"]
    assert not any(n.metadata_props for n in model.graph.node)
