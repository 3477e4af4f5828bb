"""tiexport.export on PT2E models made with torchao's own observers (a quantizer other than TIDLQuantizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from fixtures.torch_models import SmallCNN, calibration_batches  # noqa: E402
from tiexport import compat, export  # noqa: E402
from tiexport.parity import check_parity  # noqa: E402
from tiexport.quantization.pt2e import TIDLQuantizer, plain_train_eval  # noqa: E402


def test_torchao_fake_quants_export_as_qdq_sites(tmp_path: Path) -> None:
    from torchao.quantization.pt2e import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )

    ao = compat.torchao_pt2e()
    quantizer = TIDLQuantizer("WC8_AT8")  # its annotation, torchao's fake-quants and observers
    quantizer.activation = ao.QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver))
    quantizer.weight = ao.QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    prepared = ao.prepare_pt2e(compat.export_for_quantization(SmallCNN().eval(), (x,), {}), quantizer)
    for b in calibration_batches((4, 3, 32, 32)):
        prepared(b)
    plain_train_eval(prepared)
    for m in prepared.modules():
        if isinstance(m, FakeQuantize):
            m.disable_observer()  # calibrated: parity runs the module, which would observe again
    result = export(prepared, (x,), tmp_path / "own.onnx", exporter="dynamo")
    assert result.model_kind == "fake_quant"
    assert sum(s.weight for s in result.sites) == 6  # five convs and the linear: int8 weights behind DequantizeLinear
    assert check_parity(prepared, str(result.path), inputs=[{result.input_names[0]: x.numpy()}]).passed
