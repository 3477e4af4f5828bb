"""Layer-local parity (``check_parity(torch_module, onnx)``, :class:`tiexport.parity.report.LocalParity`).

In a deep network a 1-LSB rounding difference in one layer (torch and ONNX Runtime sum in different orders) can grow
to many LSB at the outputs; the layer-local comparison feeds every quantized activation of the candidate from the
reference, so each layer shows what it computes itself. The model here makes that growth happen in two layers:
``a(x) + b(x)`` where ``b`` is almost ``-a``, so the sum's quantization step is tiny next to ``a``'s and one flip of
``a``'s rounding moves the output by dozens of steps. The flips are injected by nudging ``a``'s bias in the ONNX by a
tenth of a step (about one element in ten rounds the other way). A systematic error (a zero point off by one, a
wrong scale) must still fail.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tiexport.parity import check_parity


@pytest.fixture(scope="module")
def amplifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping, disable_observer
    from torch.ao.quantization.observer import MinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    nn = torch.nn

    class Cancel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 3, padding=1)
            with torch.no_grad():
                self.b.weight.copy_(-self.a.weight * 1.01)
                self.b.bias.copy_(-self.a.bias)

        def forward(self, x: Any) -> Any:
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    act = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                                 qscheme=torch.per_tensor_affine)
    wt = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                                qscheme=torch.per_tensor_symmetric)
    example = torch.rand(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = prepare_qat_fx(Cancel().train(), QConfigMapping().set_global(QConfig(activation=act, weight=wt)),
                             (example,))
        with torch.no_grad():
            for _ in range(4):
                qat(torch.rand(4, 3, 16, 16))
        qat.apply(disable_observer)
        qat.eval()
        path = tmp_path_factory.mktemp("local") / "cancel.onnx"
        torch.onnx.export(qat, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return qat, path


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value, name))
            return
    model.graph.initializer.append(numpy_helper.from_array(value, name))


def _a_point(qat: Any) -> str:
    """The fake-quant module after conv ``a`` (the first activation point after the input's)."""
    for node in qat.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in str(node.target) \
                and node.args and getattr(node.args[0], "target", None) == "a":
            return str(node.target)
    raise AssertionError("no fake-quant after conv a")


def _nudged(qat: Any, path: Path, fraction: float) -> onnx.ModelProto:
    """The export with conv a's bias moved by ``fraction`` of the step of a's output quantization."""
    model = onnx.load(str(path))
    step = float(getattr(qat, _a_point(qat)).scale)
    bias = next(n.input[2] for n in model.graph.node if n.op_type == "Conv" and "/a/" in n.name)
    _set(model, bias, (_init(model, bias) + np.float32(fraction * step)).astype(np.float32))
    return model


def test_the_export_itself_passes_end_to_end(amplifier) -> None:
    qat, path = amplifier
    report = check_parity(qat, path, num_samples=4)
    assert report.passed and report.mode == "end-to-end" and report.local is None


def test_rounding_flips_amplified_downstream_pass_layer_by_layer(amplifier) -> None:
    qat, path = amplifier
    report = check_parity(qat, _nudged(qat, path, 0.1), num_samples=4)
    out = next(iter(report.outputs.values()))
    assert not out.passed and out.max_lsb is not None and out.max_lsb > 5  # grown through the cancelling sum
    assert report.local is not None and report.local.passed
    assert report.passed and report.mode == "layer-local"
    a = next(x for x in report.local.layers if x.module == _a_point(qat))
    assert a.metrics.max_lsb is not None and a.metrics.max_lsb <= 1.0 + 1e-3
    assert a.metrics.exact is not None and 0.5 < a.metrics.exact < 1.0  # the flips are there, one step each
    assert all(m.exact == 1.0 for m in report.local.outputs.values())  # fed a's reference values: exact
    assert report.local.forced >= 3
    assert "PASSED layer by layer" in report.to_text() and "PASSED layer by layer" in report.summary()
    d = report.to_dict()
    assert d["mode"] == "layer-local" and d["local"]["passed"] and d["local"]["layers"]


def test_local_false_keeps_the_end_to_end_verdict(amplifier) -> None:
    qat, path = amplifier
    report = check_parity(qat, _nudged(qat, path, 0.1), num_samples=2, local=False)
    assert not report.passed and report.mode == "failed" and report.local is None


def test_a_zero_point_off_by_one_fails_layer_by_layer(amplifier) -> None:
    """Every element of a's output one step off: within 1 LSB, but never exact -- a systematic error."""
    qat, path = amplifier
    model = onnx.load(str(path))
    point = _a_point(qat)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and f"/{point}/" in f"/{n.name}")
    zp = _init(model, dq.input[2])
    _set(model, "zp_off_by_one", (zp.astype(np.int32) - 1).astype(zp.dtype))
    dq.input[2] = "zp_off_by_one"
    report = check_parity(qat, model, num_samples=2)
    assert report.local is not None and not report.local.passed and not report.passed
    a = next(x for x in report.local.layers if x.module == point)
    assert a.metrics.passed and a.metrics.exact is not None and a.metrics.exact < 0.5
    assert point in report.to_text()


def test_a_wrong_scale_fails_layer_by_layer(amplifier) -> None:
    qat, path = amplifier
    model = onnx.load(str(path))
    point = _a_point(qat)
    _set(model, f"{point}.scale", (_init(model, f"{point}.scale") * 1.5).astype(np.float32))
    report = check_parity(qat, model, num_samples=2)
    assert not report.passed and report.local is not None and not report.local.passed
    assert report.mode == "failed" and "FAILED" in report.summary()


def test_the_forced_model_keeps_the_candidate_intact(amplifier) -> None:
    """The forced run is built from a serialized copy: the candidate ModelProto is not touched."""
    qat, path = amplifier
    model = _nudged(qat, path, 0.1)
    before = model.SerializeToString()
    check_parity(qat, model, num_samples=1)
    assert model.SerializeToString() == before


def test_forced_bytes_is_the_model_with_consumers_rewired() -> None:
    from tiexport.parity.runner import _forced_bytes, forced_input_name

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["h"], name="add"),
                               helper.make_node("Mul", ["h", "w"], ["y"], name="mul")], "g", [x], [y],
                              [numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    forced = onnx.load_from_string(_forced_bytes(model, {"h": onnx.TensorProto.FLOAT}, ()))
    assert [n.input[0] for n in forced.graph.node] == ["x", forced_input_name("h")]
    assert [i.name for i in forced.graph.input] == ["x", forced_input_name("h")]
    assert [o.name for o in forced.graph.output] == ["y", "h"]
    assert [t.name for t in forced.graph.initializer] == ["w"]
    assert forced.opset_import[0].version == 17
    import onnxruntime as ort

    sess = ort.InferenceSession(forced.SerializeToString(), providers=["CPUExecutionProvider"])
    y_val, h_val = sess.run(["y", "h"], {"x": np.ones(2, np.float32), forced_input_name("h"): np.full(2, 10, np.float32)})
    assert h_val.tolist() == [3.0, 4.0] and y_val.tolist() == [20.0, 30.0]
