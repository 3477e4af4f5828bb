"""PTQPT2EModule / QATPT2EModule end to end: calibrate or train, (convert,) export with the dynamo exporter, fix for the
type's device, parity, validate; the training-loop semantics they share with the FX wrappers; a model torch.fx cannot
trace."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from torch import nn  # noqa: E402

from fixtures.torch_models import SmallCNN, calibration_batches  # noqa: E402
from fixtures.zoo_models import make_family  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402
from tiexport.quantization.qconfig import QCONFIG_TYPES  # noqa: E402
from tiexport.wrappers import PTCFxModule  # noqa: E402
from tiexport.wrappers.pt2e import PTQPT2EModule, QATPT2EModule  # noqa: E402

SHAPE = (1, 3, 32, 32)
DEVICE_OF = {"WT8SYMP2_AT8SYMP2": "TDA4VM"}  # the others: an MMAv2 device


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _calibrate(w: PTQPT2EModule, shape: tuple[int, ...] = SHAPE) -> PTQPT2EModule:
    for _ in range(w.total_epochs):
        w.train()
        for b in calibration_batches((4, *shape[1:]), n=3):
            w(b)
    return w.eval()  # type: ignore[return-value]


def _train(w: QATPT2EModule, shape: tuple[int, ...] = SHAPE, steps: int = 2) -> QATPT2EModule:
    opt = torch.optim.SGD(w.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(w.total_epochs):
        w.train()
        for b in calibration_batches((4, *shape[1:]), n=steps):
            loss = w(b).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.eval()  # type: ignore[return-value]


def _check(result: object, device: str) -> None:
    assert result.parity_passed, result.parity_summary  # type: ignore[attr-defined]
    dev = result.validation.devices[device]  # type: ignore[attr-defined]
    assert dev.count("error") == 0, dev.verdict


def _qdq_names(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("qtype", sorted(QCONFIG_TYPES))
def test_ptq_exports_validates_and_passes_parity_for_every_type(qtype: str, tmp_path: Path) -> None:
    device = DEVICE_OF.get(qtype, "AM68A")
    w = _calibrate(PTQPT2EModule(_seeded(SmallCNN()), qconfig_type=qtype, example_inputs=torch.randn(*SHAPE)))
    result = w.export(torch.randn(*SHAPE), tmp_path / "m.onnx", device=device)
    _check(result, device)
    assert result.export_result.exporter == "dynamo"
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert meta["qconfig_type"] == qtype
    # int8 weights behind DequantizeLinear, named after the weight they come from
    assert "stem.0.weight_fake_quant/DequantizeLinear" in _qdq_names(result.path)


@pytest.mark.parametrize("qtype", sorted(QCONFIG_TYPES))
def test_qat_exports_validates_and_passes_parity_for_every_type(qtype: str, tmp_path: Path) -> None:
    device = DEVICE_OF.get(qtype, "AM68A")
    w = _train(QATPT2EModule(_seeded(SmallCNN()), 2, qconfig_type=qtype, example_inputs=torch.randn(*SHAPE)))
    result = w.export(torch.randn(*SHAPE), tmp_path / "m.onnx", device=device)
    _check(result, device)
    types = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "BatchNormalization" not in types  # Conv+BN folded


def test_converted_model_exports_the_same_sites(tmp_path: Path) -> None:
    x = torch.randn(*SHAPE)
    w = _calibrate(PTQPT2EModule(_seeded(SmallCNN()), example_inputs=x))
    prepared = w.export(x, tmp_path / "prepared.onnx", device="AM68A")
    w = w.convert()
    converted = w.export(x, tmp_path / "converted.onnx", device="AM68A")
    _check(converted, "AM68A")
    assert converted.export_result.model_kind == "converted"
    # the same fake-quants, named alike; scales identical site by site
    assert {n.split("/")[0] for n in _qdq_names(prepared.path)} == {n.split("/")[0] for n in _qdq_names(converted.path)}
    scales = {s.module: s.scale for s in prepared.export_result.sites}
    assert all(scales[s.module] == s.scale for s in converted.export_result.sites)


class ShapeLoop(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace ``range(x.shape[1] // 4)``, torch.export can."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(channels // 4))
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for i in range(x.shape[1] // 4):
            parts.append(torch.relu(self.convs[i](x[:, 4 * i: 4 * i + 4])))
        return self.head(torch.cat(parts, dim=1))


def test_a_model_torch_fx_cannot_trace_works_on_the_pt2e_path(tmp_path: Path) -> None:
    x = torch.randn(1, 8, 16, 16)
    # torch.fx fails on it: one UsageError that points at this path (it was a raw TypeError from the traced range())
    with pytest.raises(UsageError, match=r"torch.fx cannot trace ShapeLoop .*PTQPT2EModule"):
        PTCFxModule(ShapeLoop(), example_inputs=x)
    w = _calibrate(PTQPT2EModule(_seeded(ShapeLoop()), example_inputs=x), shape=tuple(x.shape))
    result = w.export(x, tmp_path / "loop.onnx", device="AM68A")
    _check(result, "AM68A")
    q = QATPT2EModule(_seeded(ShapeLoop()), 1, example_inputs=x)
    result = _train(q, shape=tuple(x.shape)).export(x, tmp_path / "loop_qat.onnx", device="AM68A")
    _check(result, "AM68A")


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2", "fpn"])
def test_zoo_families_ptq(family: str, tmp_path: Path) -> None:
    model, shape = make_family(family)
    w = _calibrate(PTQPT2EModule(model, example_inputs=torch.randn(*shape)), shape=shape)
    _check(w.export(torch.randn(*shape), tmp_path / f"{family}.onnx", device="AM68A"), "AM68A")


@pytest.mark.parametrize("family", ["convnext", "vit_sdpa"])
@pytest.mark.parametrize(("qconfig_type", "device"), [("WC8_AT8", "AM68A"), ("WT8SYMP2_AT8SYMP2", "TDA4VM")])
def test_zoo_families_with_layer_norm_and_attention_ptq(family: str, qconfig_type: str, device: str,
                                                        tmp_path: Path) -> None:
    """F.scaled_dot_product_attention is written out before torch.export (also under equalization's trace for the
    per-tensor type): its MatMuls get Q/DQ, no TIDL014 error; on TDA4VM the Softmax output meeting V is int8."""
    model, shape = make_family(family)
    w = _calibrate(PTQPT2EModule(model, qconfig_type=qconfig_type, example_inputs=torch.randn(*shape)), shape=shape)
    result = w.export(torch.randn(*shape), tmp_path / f"{family}.onnx", device=device)
    _check(result, device)
    rules = {f.rule_id for f in result.validation.devices[device].findings if f.severity in ("error", "warning")}
    assert "TIDL014" not in rules and "TIDL024" not in rules, rules


@pytest.mark.parametrize("family", ["mobilenetv3"])
def test_zoo_families_qat(family: str, tmp_path: Path) -> None:
    model, shape = make_family(family)
    w = _train(QATPT2EModule(model, 1, example_inputs=torch.randn(*shape)), shape=shape, steps=1)
    _check(w.export(torch.randn(*shape), tmp_path / f"{family}.onnx", device="AM68A"), "AM68A")


def _bn_training_args(w: QATPT2EModule) -> set[bool]:
    return {n.args[5] for n in w.module.graph.nodes if n.target == torch.ops.aten.batch_norm.default}


def test_epochs_freeze_batch_norm_then_observers_and_eval_freezes_both() -> None:
    w = QATPT2EModule(_seeded(SmallCNN()), 4, example_inputs=torch.randn(*SHAPE))  # TI defaults: BN 1, observers 3
    x = torch.randn(2, 3, 32, 32)
    w.train()
    assert not w.bn_frozen and not w.observers_frozen and _bn_training_args(w) == {True}
    w(x)
    w.train()
    assert w.bn_frozen and not w.observers_frozen and _bn_training_args(w) == {False}
    stats = [b.clone() for n, b in w.module.named_buffers() if n.endswith("running_mean")]
    w(x)
    assert all(torch.equal(a, b) for a, b in zip(stats, [b for n, b in w.module.named_buffers()
                                                        if n.endswith("running_mean")], strict=True))
    w.train()
    w.train()
    assert w.observers_frozen
    fqs = [m for m in w.module.modules() if hasattr(m, "observer_enabled")]
    assert fqs and all(int(m.observer_enabled[0]) == 0 for m in fqs)
    w.eval()
    assert w.bn_frozen and w.observers_frozen and not w.module.training


def test_ptq_batch_norm_is_folded_and_bias_calibration_moves_biases() -> None:
    w = PTQPT2EModule(_seeded(SmallCNN()), example_inputs=torch.randn(*SHAPE), bias_calibration_factor=0.05)
    assert not _bn_training_args(w)  # folded into the convolutions at prepare
    calibrator = w._bias_calibrator
    assert calibrator is not None and calibrator.targets
    before = [t.bias.detach().clone() for t in calibrator.targets]
    _calibrate(w)
    assert any(not torch.equal(a, t.bias) for a, t in zip(before, calibrator.targets, strict=True))


def test_device_picks_the_type_and_bad_arguments_are_usage_errors() -> None:
    x = torch.randn(*SHAPE)
    assert PTQPT2EModule(SmallCNN(), example_inputs=x, device="TDA4VM").qconfig_type_name == "WT8SYMP2_AT8SYMP2"
    assert PTQPT2EModule(SmallCNN(), example_inputs=x).qconfig_type_name == "WC8_AT8"
    with pytest.raises(UsageError, match="total_epochs"):
        QATPT2EModule(SmallCNN(), 0)


@pytest.mark.parametrize("cls", [PTQPT2EModule, QATPT2EModule])
def test_tda4vm_type_equalizes_cross_layer_keeping_the_float_function(cls: type) -> None:
    model = _seeded(SmallCNN()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    args = (2,) if cls is QATPT2EModule else ()
    w = cls(model, *args, qconfig_type="WT8SYMP2_AT8SYMP2", example_inputs=x[:1])
    assert w.cross_layer_equalization and w.equalization is not None and w.equalization.pairs
    for m in w.module.modules():
        if hasattr(m, "disable_fake_quant"):
            m.disable_fake_quant()
    w.eval()
    with torch.no_grad():
        torch.testing.assert_close(w(x), expected, atol=1e-4, rtol=1e-4)


def test_prepares_on_the_first_forward_without_example_inputs() -> None:
    w = PTQPT2EModule(_seeded(SmallCNN()))
    assert not w.is_prepared
    w.train()
    w(torch.randn(2, 3, 32, 32))
    assert w.is_prepared
    w(torch.randn(3, 3, 32, 32))  # the batch dimension stays free
