"""What export does to the torch model and how sites come out: state restored afterwards, QAT conv-bn folded, Q/DQ
named after modules, per-channel axes, restricted (< 8-bit) ranges, disabled fake-quants, calibrated-but-unconverted
and reference models."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402

import tiexport  # noqa: E402
from tests.symbolics.helpers import parity_fraction, quiet  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402

SHAPE = (1, 3, 8, 8)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(SHAPE, generator=g) for _ in range(n)]


def _qat(qconfig_mapping: object = None) -> torch.nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    mapping = qconfig_mapping or tq.get_default_qat_qconfig_mapping("qnnpack")
    with quiet():
        prepared = prepare_qat_fx(_ConvNet().train(), mapping, (torch.rand(SHAPE),))
        for b in _batches():
            prepared(b)
    return prepared.eval()


def _four_bit_mapping(activation_bits: int = 8) -> tq.QConfigMapping:
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0,
                                    quant_max=2**activation_bits - 1, dtype=torch.quint8)
    weight = tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
                                       dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfigMapping().set_global(tq.QConfig(activation=act, weight=weight))


def _fake_quants(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, tq.FakeQuantizeBase)}


def _export(model: nn.Module, path, **kw) -> tiexport.quantization.ExportResult:  # type: ignore[name-defined]
    return tiexport.export(model, torch.rand(SHAPE), path, **kw)


# ------------------------------------------------------------------------------------------- state is restored


def test_training_flags_are_restored(tmp_path):
    model = _qat().train()
    model.get_submodule("fc").eval()
    before = {n: m.training for n, m in model.named_modules()}
    _export(model, tmp_path / "m.onnx")
    assert {n: m.training for n, m in model.named_modules()} == before


def test_observer_flags_and_scales_are_unchanged_by_export(tmp_path):
    model = _qat()  # torch's fused fake-quant: observers on even in eval
    fqs = _fake_quants(model)
    before = {n: (fq.observer_enabled.clone(), fq.fake_quant_enabled.clone(), fq.scale.clone()) for n, fq in
              fqs.items()}
    _export(model, tmp_path / "m.onnx", exporter="torchscript")
    for n, fq in fqs.items():
        obs, fake, scale = before[n]
        assert torch.equal(fq.observer_enabled, obs) and torch.equal(fq.fake_quant_enabled, fake)
        assert torch.equal(fq.scale, scale)


def test_no_patched_forward_or_folded_buffer_is_left_on_the_model(tmp_path):
    model = _qat()
    _export(model, tmp_path / "m.onnx")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(hasattr(m, "folded_weight") for m in model.modules())


# ------------------------------------------------------------------------------------------- graph shape


def test_qat_conv_bn_is_folded_into_the_conv(tmp_path):
    _export(_qat(), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1


def test_activation_sites_are_named_after_their_fake_quant_modules(tmp_path):
    model = _qat()
    _export(model, tmp_path / "m.onnx")
    names = {n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    acts = [n for n in _fake_quants(model) if n.startswith("activation_post_process")]
    assert acts
    for n in acts:
        assert {f"{n}/QuantizeLinear", f"{n}/DequantizeLinear"} <= names


def test_weight_site_reads_an_int8_initializer_named_after_the_module(tmp_path):
    _export(_qat(), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    dq = next(n for n in model.graph.node if n.name == "conv.weight_fake_quant/DequantizeLinear")
    init = next(i for i in model.graph.initializer if i.name == dq.input[0])
    assert init.name == "conv.weight_fake_quant.quantized" and init.data_type == onnx.TensorProto.INT8


def test_per_channel_conv_weights_dequantize_along_output_channels(tmp_path):
    _export(_qat(tq.get_default_qat_qconfig_mapping("x86")), tmp_path / "m.onnx")  # x86: per-channel weights
    model = onnx.load(str(tmp_path / "m.onnx"))
    dq = next(n for n in model.graph.node if n.name == "conv.weight_fake_quant/DequantizeLinear")
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == dq.input[1])
    assert axis == 0 and scale.shape == (4,)


def test_result_lists_one_site_per_fake_quant_module(tmp_path):
    model = _qat()
    result = _export(model, tmp_path / "m.onnx")
    assert {s.module for s in result.sites} == set(_fake_quants(model))


class _Shared(nn.Module):
    """One fake-quant module applied to two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fq = tq.FakeQuantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq(x) + self.fq(x * 0.5)


def test_a_shared_fake_quant_gets_numbered_sites(tmp_path):
    model = _Shared()
    model(torch.rand(SHAPE))
    _export(model.eval(), tmp_path / "m.onnx")
    names = [n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "QuantizeLinear"]
    assert names == ["fq/QuantizeLinear", "fq/QuantizeLinear_1"]


# ------------------------------------------------------------------------------------------- restricted ranges


@pytest.fixture(scope="module")
def four_bit_weights():
    return _qat(_four_bit_mapping())


def test_four_bit_weights_are_stored_within_their_range(tmp_path, four_bit_weights):
    _export(four_bit_weights, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    q = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv.weight_fake_quant.quantized"))
    assert q.min() >= -8 and q.max() <= 7 and q.min() < 0 < q.max()


def test_four_bit_weights_warn_that_tidl_takes_8_bit_only(tmp_path, four_bit_weights, caplog):
    with caplog.at_level(logging.WARNING, logger="tiexport"):
        result = _export(four_bit_weights, tmp_path / "m.onnx")
    assert any("4-bit" in w and "8-bit only" in w for w in result.warnings)
    assert any("8-bit only" in r.getMessage() for r in caplog.records)


def test_four_bit_weights_match_torch_within_one_step(tmp_path, four_bit_weights):
    _export(four_bit_weights, tmp_path / "m.onnx")
    assert parity_fraction(four_bit_weights, tmp_path / "m.onnx", SHAPE) >= 0.999


def test_four_bit_activations_are_clipped_before_their_quantize(tmp_path):
    model = _qat(_four_bit_mapping(activation_bits=4))
    _export(model, tmp_path / "m.onnx")
    names = {n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "activation_post_process_0/Clip" in names
    assert parity_fraction(model, tmp_path / "m.onnx", SHAPE) >= 0.999


def test_a_16_bit_fake_quant_is_refused_with_the_reason(tmp_path):
    model = nn.Sequential(tq.FakeQuantize(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=65535,
                                          dtype=torch.qint32))
    model(torch.rand(SHAPE))
    with pytest.raises(UsageError, match="8-bit"):
        _export(model.eval(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------- other model states


def test_a_disabled_fake_quant_exports_without_qdq_and_warns(tmp_path):
    model = _qat()
    model.get_submodule("activation_post_process_0").disable_fake_quant()
    result = _export(model, tmp_path / "m.onnx")
    names = {n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not any(n.startswith("activation_post_process_0/") for n in names)
    assert any("disabled" in w for w in result.warnings)


def test_an_uncalibrated_fake_quant_is_reported(tmp_path):
    model = _Shared().eval()  # never ran in training mode: the observer saw no data
    result = _export(model, tmp_path / "m.onnx")
    assert any("never observed" in w for w in result.warnings)


def _observed() -> torch.nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.manual_seed(0)
    with quiet(), torch.no_grad():
        prepared = prepare_fx(_ConvNet().eval(), tq.get_default_qconfig_mapping("qnnpack"), (torch.rand(SHAPE),))
        for b in _batches():
            prepared(b)
    return prepared


def test_a_calibrated_unconverted_model_is_converted_on_a_copy(tmp_path):
    model = _observed()
    result = _export(model, tmp_path / "m.onnx")
    assert result.model_kind == "converted" and any("convert_fx" in w for w in result.warnings)
    assert any(isinstance(m, tq.ObserverBase) for m in model.modules())  # the user's model still observes


def test_a_reference_model_matches_torch_within_one_step(tmp_path):
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx

    with quiet():
        model = convert_to_reference_fx(_observed())
    _export(model, tmp_path / "m.onnx", exporter="torchscript")
    assert parity_fraction(model, tmp_path / "m.onnx", SHAPE) >= 0.999


def test_a_float_model_exports_with_a_warning(tmp_path):
    result = _export(_ConvNet().eval(), tmp_path / "m.onnx")
    assert result.model_kind == "float" and any("float model" in w for w in result.warnings)


def test_weights_of_a_converted_model_are_the_converted_int8_values(tmp_path):
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet():
        model = convert_fx(_observed())
    _export(model, tmp_path / "m.onnx")
    onnx_model = onnx.load(str(tmp_path / "m.onnx"))
    q = numpy_helper.to_array(next(i for i in onnx_model.graph.initializer if i.name == "conv.weight.quantized"))
    np.testing.assert_array_equal(q, model.get_submodule("conv").weight().int_repr().numpy())


def _learnable() -> torch.nn.Module:
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    act = _LearnableFakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                           dtype=torch.quint8, use_grad_scaling=True)
    weight = _LearnableFakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                              quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                              ch_axis=0, channel_len=4, use_grad_scaling=True)
    torch.manual_seed(0)
    model = tq.QuantWrapper(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model.qconfig = tq.QConfig(activation=act, weight=weight)
    with quiet():
        tq.prepare_qat(model.train(), inplace=True)
        for b in _batches():
            model(b)
        for m in model.modules():
            if isinstance(m, _LearnableFakeQuantize):
                m.toggle_qparam_learning(True)
                m.toggle_observer_update(False)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        for b in _batches(seed=1):
            loss = model(b).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_learnable_fake_quant_matches_torch_within_one_step(tmp_path):
    model = _learnable()
    _export(model, tmp_path / "m.onnx")
    assert parity_fraction(model, tmp_path / "m.onnx", SHAPE) >= 0.999
