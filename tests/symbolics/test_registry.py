"""Scoped registration: tiexport's symbolics exist only during an export, a user's own symbolics and translations
keep working and stay registered, exporting twice gives the same file, and exports from several threads work."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402

import tiexport  # noqa: E402
from tiexport import compat  # noqa: E402
from tiexport.symbolics import REGISTRY, ExportOp, SymbolicRegistry  # noqa: E402
from tiexport.symbolics.qdq import MARKER_DOMAIN, MARKER_OP  # noqa: E402

OUR_OP = "tiexport::quantize_dequantize"
USER_OP = "tiexport_tests::shifted_relu"


@torch.library.custom_op(USER_OP, mutates_args=())
def shifted_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x - 0.25)


@shifted_relu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _user_symbolic(g, x):
    shift = g.op("Constant", value_t=torch.tensor(0.25))
    return g.op("Relu", g.op("Sub", x, shift))


def _user_translation(x):
    from onnxscript import opset18 as op

    return op.Relu(op.Sub(x, op.Constant(value_float=0.25)))


class _UsesUserOp(torch.nn.Module):
    """A fake-quant conv followed by the user's custom op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tiexport_tests.shifted_relu(self.conv(x))


def _qat(model: torch.nn.Module, shape: tuple[int, ...] = (1, 3, 8, 8)) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from tests.symbolics.helpers import quiet

    with quiet():
        prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("qnnpack"), (torch.rand(shape),))
        prepared(torch.rand(shape))
    return prepared.eval()


def _schema_registered() -> bool:
    try:
        onnx.defs.get_schema(MARKER_OP, 1, MARKER_DOMAIN)
    except onnx.defs.SchemaError:
        return False
    return True


@pytest.fixture
def user_symbolic():
    torch.onnx.register_custom_op_symbolic(USER_OP, _user_symbolic, 17)
    yield _user_symbolic
    compat.restore_ts_custom_symbolic(USER_OP, 17, None)


def _tiny_qat() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    return _qat(model)


def test_nothing_is_registered_outside_an_export(tmp_path):
    tiexport.export(_tiny_qat(), torch.rand(1, 3, 8, 8), tmp_path / "m.onnx")
    assert compat.get_ts_custom_symbolic(OUR_OP, 17) is None
    assert not _schema_registered()


def test_scope_registers_symbolic_and_schema_inside():
    with REGISTRY.scoped("torchscript", 17):
        assert compat.get_ts_custom_symbolic(OUR_OP, 17) is not None
        assert _schema_registered()


def test_scope_puts_back_a_users_symbolic_registered_under_our_name():
    def users(g, *args):  # a user who registered something under our op name before exporting
        raise AssertionError("not called")

    torch.onnx.register_custom_op_symbolic(OUR_OP, users, 17)
    try:
        with REGISTRY.scoped("torchscript", 17):
            assert compat.get_ts_custom_symbolic(OUR_OP, 17) is not users
        assert compat.get_ts_custom_symbolic(OUR_OP, 17) is users
    finally:
        compat.restore_ts_custom_symbolic(OUR_OP, 17, None)


def test_scope_restores_after_an_exception():
    with pytest.raises(RuntimeError), REGISTRY.scoped("torchscript", 17):
        raise RuntimeError("exporter failed")
    assert compat.get_ts_custom_symbolic(OUR_OP, 17) is None
    assert not _schema_registered()


def test_export_uses_the_users_symbolic_and_leaves_it_registered(tmp_path, user_symbolic):
    model = _qat(_UsesUserOp())
    tiexport.export(model, torch.rand(1, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Sub" in ops and "QuantizeLinear" in ops
    assert compat.get_ts_custom_symbolic(USER_OP, 17) is user_symbolic


def test_dynamo_export_merges_the_users_translation_table(tmp_path):
    pytest.importorskip("onnxscript")
    model = _qat(_UsesUserOp())
    table = {torch.ops.tiexport_tests.shifted_relu.default: _user_translation}
    tiexport.export(model, torch.rand(1, 3, 8, 8), tmp_path / "m.onnx", exporter="dynamo",
                    custom_translation_table=table)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Sub" in ops and "DequantizeLinear" in ops


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exporting_twice_writes_the_same_model(tmp_path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    model, x = _tiny_qat(), torch.rand(1, 3, 8, 8)
    tiexport.export(model, x, tmp_path / "a.onnx", exporter=exporter)
    tiexport.export(model, x, tmp_path / "b.onnx", exporter=exporter)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_exports_from_two_threads_both_succeed(tmp_path):
    models = [_tiny_qat(), _tiny_qat()]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for k in range(2):
                tiexport.export(models[i], torch.rand(1, 3, 8, 8), tmp_path / f"t{i}_{k}.onnx")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(tmp_path.glob("t*.onnx"))) == 4
    assert compat.get_ts_custom_symbolic(OUR_OP, 17) is None


def test_registry_refuses_a_second_op_of_the_same_name():
    reg = SymbolicRegistry()
    op = ExportOp("ns::op", lambda: None, lambda g, x: x, lambda x: x)
    reg.add(op)
    with pytest.raises(ValueError, match="already"):
        reg.add(op)
