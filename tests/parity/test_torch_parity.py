"""check_parity with a torch reference: a torch.ao FX fake-quant CNN against its TorchScript-exported QDQ ONNX.

The model is prepared with ``prepare_qat_fx`` and plain ``FakeQuantize`` (the fused moving-average op does not export
with the TorchScript exporter), calibrated, observers disabled, then exported with ``torch.onnx.export(dynamo=False)``.
The mapping tests at the end need no torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures.builders import QdqBuilder
from tiexport.context import ModelContext
from tiexport.errors import UsageError
from tiexport.onnx_io import as_model
from tiexport.parity import check_parity
from tiexport.parity.torch_reference import map_fake_quant_points


def _tiny_cnn(torch: Any) -> Any:
    nn = torch.nn

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.relu2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            x = self.relu1(self.conv1(x))
            x = self.relu2(self.conv2(x))
            return self.fc(torch.flatten(self.pool(x), 1))

    return TinyCNN()


@pytest.fixture(scope="module")
def fx_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping, disable_observer
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    wt = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                                dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    example = torch.rand(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = prepare_qat_fx(_tiny_cnn(torch).train(), QConfigMapping().set_global(QConfig(activation=act, weight=wt)),
                             (example,))
        with torch.no_grad():
            for _ in range(6):
                qat(torch.rand(4, 3, 16, 16))
        qat.apply(disable_observer)
        qat.eval()
        path = tmp_path_factory.mktemp("fx") / "tiny_cnn.onnx"
        torch.onnx.export(qat, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return qat, path


def _expected_points(qat: Any) -> list[str]:
    """Activation fake-quant calls in execution order, read from the FX graph (not from hooks)."""
    canonical = {id(m): name for name, m in qat.named_modules()}
    labels, calls = [], {}
    for node in qat.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in node.target:
            name = canonical[id(qat.get_submodule(node.target))]
            k = calls.get(name, 0)
            calls[name] = k + 1
            labels.append(name if k == 0 else f"{name}#{k}")
    return labels


def _corrupt(path: Path, scale_name: str, factor: float) -> onnx.ModelProto:
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == scale_name:
            init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * factor).astype(np.float32), init.name))
            break
    else:
        raise AssertionError(f"no initializer {scale_name}")
    return model


# ------------------------------------------------------------------------------------------------ torch vs ONNX
def test_fx_model_passes_within_one_lsb_on_999_per_mille(fx_model) -> None:
    qat, path = fx_model
    report = check_parity(qat, path, num_samples=8)
    assert report.passed
    for m in report.outputs.values():
        assert m.criterion == "lsb"
        assert m.within_1_lsb is not None and m.within_1_lsb >= 0.999


def test_per_layer_maps_every_activation_fake_quant_to_its_dq(fx_model) -> None:
    qat, path = fx_model
    report = check_parity(qat, path, per_layer=True, num_samples=4)
    assert [layer.module for layer in report.layers] == _expected_points(qat)
    ctx = ModelContext(as_model(path))
    for layer in report.layers:
        assert layer.op_type == "DequantizeLinear"
        assert ctx.producer_of(layer.tensor).name == layer.node
        module = layer.module.split("#")[0]
        assert f"/{module}" in layer.node
        assert layer.metrics.within_1_lsb is not None and layer.metrics.within_1_lsb >= 0.999
    assert report.passed and report.first_divergence is None


def test_corrupted_onnx_scale_is_named_as_first_divergence(fx_model) -> None:
    qat, path = fx_model
    bad = _corrupt(path, "activation_post_process_1.scale", 1.7)
    report = check_parity(qat, bad, per_layer=True, num_samples=4)
    assert report.first_divergence is not None
    assert report.first_divergence["module"] == "activation_post_process_1"
    assert report.first_divergence["node"] == "/activation_post_process_1/DequantizeLinear"


def test_errors_are_measured_in_the_torch_fake_quant_step(fx_model) -> None:
    qat, path = fx_model
    bad = _corrupt(path, "activation_post_process_1.scale", 1.7)
    report = check_parity(qat, bad, per_layer=True, num_samples=2)
    layer = next(x for x in report.layers if x.module == "activation_post_process_1")
    assert layer.metrics.step == pytest.approx(float(qat.activation_post_process_1.scale))


def test_mapping_falls_back_to_topological_order_without_names(fx_model) -> None:
    qat, path = fx_model
    named = check_parity(qat, path, per_layer=True, num_samples=2)
    anonymous = onnx.load(str(path))
    for i, node in enumerate(anonymous.graph.node):
        node.name = f"n{i}"
    report = check_parity(qat, anonymous, per_layer=True, num_samples=2)
    assert [(x.module, x.tensor) for x in report.layers] == [(x.module, x.tensor) for x in named.layers]
    assert report.passed


def test_module_state_is_restored_after_the_check(fx_model) -> None:
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import enable_observer

    qat, path = fx_model
    qat.train()
    qat.apply(enable_observer)
    try:
        before = {k: v.clone() for k, v in qat.state_dict().items()}
        training = {name: m.training for name, m in qat.named_modules()}
        check_parity(qat, path, per_layer=True, num_samples=2)
        after = qat.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert {name: m.training for name, m in qat.named_modules()} == training
    finally:
        from torch.ao.quantization import disable_observer

        qat.apply(disable_observer)
        qat.eval()


def test_eager_float_module_against_its_float_export(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"])
    report = check_parity(module, path, num_samples=2, per_layer=True)
    (m,) = report.outputs.values()
    assert report.passed and m.criterion == "allclose" and m.max_lsb is None
    assert report.layers == [] and any("no fake-quant" in note for note in report.notes)


def test_output_count_mismatch_is_a_usage_error(fx_model) -> None:
    torch = pytest.importorskip("torch")
    qat, path = fx_model

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = qat

        def forward(self, x: Any) -> Any:
            y = self.inner(x)
            return y, y

    with pytest.raises(UsageError, match="2 tensor"):
        check_parity(Twice(), path, num_samples=1)


# ------------------------------------------------------------------------------------------------ mapping (no torch)
def _chain(names: list[str]) -> ModelContext:
    """input -> Relu -> Q/DQ -> Relu -> Q/DQ ..., the i-th Q/DQ pair's nodes named '/<names[i]>/...'."""
    b = QdqBuilder(name="chain")
    x = b.input("input", [1, 4])
    for i, _ in enumerate(names):
        x = b.qdq(b.relu(x), 2.0**-4, 0, "uint8", name=f"p{i}")
    b.output(x)
    model = b.build()
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for i, name in enumerate(names):
        qdq[2 * i].name = f"/{name}/QuantizeLinear"
        qdq[2 * i + 1].name = f"/{name}/DequantizeLinear"
    return ModelContext(as_model(model))


def test_mapping_respects_name_boundaries() -> None:
    ctx = _chain(["activation_post_process_10", "activation_post_process_1"])
    # execution order says _1 first, but the names say otherwise: names win
    matches, notes = map_fake_quant_points([("activation_post_process_1", 0), ("activation_post_process_10", 0)], ctx)
    by_module = {m.module: m.node for m in matches}
    assert by_module == {"activation_post_process_1": "/activation_post_process_1/DequantizeLinear",
                         "activation_post_process_10": "/activation_post_process_10/DequantizeLinear"}
    assert all(m.how == "name" for m in matches) and notes == []


def test_mapping_of_a_shared_module_called_twice() -> None:
    ctx = _chain(["act", "act_1", "other"])
    matches, _ = map_fake_quant_points([("act", 0), ("act", 1), ("other", 0)], ctx)
    assert [(m.label, m.node) for m in matches] == [("act", "/act/DequantizeLinear"),
                                                    ("act#1", "/act_1/DequantizeLinear"),
                                                    ("other", "/other/DequantizeLinear")]


def test_mapping_matches_dotted_module_names() -> None:
    ctx = _chain(["backbone_stage1_quant", "head/out_quant"])
    matches, _ = map_fake_quant_points([("backbone.stage1.quant", 0), ("head.out_quant", 0)], ctx)
    assert [m.how for m in matches] == ["name", "name"]
    assert [m.node for m in matches] == ["/backbone_stage1_quant/DequantizeLinear", "/head/out_quant/DequantizeLinear"]


def test_mapping_reports_points_it_cannot_place() -> None:
    ctx = _chain(["a", "b"])
    matches, notes = map_fake_quant_points([("x", 0), ("y", 0), ("z", 0)], ctx)
    assert matches == [] and notes and "3 fake-quant point(s) not mapped" in notes[0]
