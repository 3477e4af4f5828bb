"""PTCFxModule / QATFxModule: epoch semantics, freezing, eval, inputs, memory, devices, convert, bias calibration."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.ao.quantization import FakeQuantize  # noqa: E402

from tests.quantization._models import MHANet, TinyCNN, TwoInputNet, batches, seeded  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402
from tiexport.quantization.attention import QuantFriendlyMultiheadAttention  # noqa: E402
from tiexport.wrappers import PTCFxModule, QATFxModule  # noqa: E402

SHAPE = (4, 1, 6, 6)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _fqs(w: nn.Module) -> list[FakeQuantize]:
    return [m for m in w.module.modules() if isinstance(m, FakeQuantize)]


def _conv_bn(w: nn.Module) -> nn.Module:
    return next(m for m in w.module.modules() if hasattr(m, "freeze_bn_stats"))


def _run_epoch(w: nn.Module, data: list[torch.Tensor]) -> None:
    w.train()
    for x in data:
        w(x)


# --- epochs and freezing -------------------------------------------------------------------------------------------


def test_each_train_call_counts_one_epoch() -> None:
    w = QATFxModule(seeded(TinyCNN()), total_epochs=5, example_inputs=torch.randn(SHAPE))
    for _ in range(3):
        w.train()
    assert w.num_epochs_tracked == 3


def test_eval_does_not_count_an_epoch() -> None:
    w = QATFxModule(seeded(TinyCNN()), total_epochs=5, example_inputs=torch.randn(SHAPE))
    w.train()
    w.eval()
    assert w.num_epochs_tracked == 1


def test_ti_defaults_when_not_given() -> None:
    qat = QATFxModule(seeded(TinyCNN()), total_epochs=10)
    assert (qat.num_batch_norm_update_epochs, qat.num_observer_update_epochs) == (4, 6)
    ptc = PTCFxModule(seeded(TinyCNN()))
    assert ptc.total_epochs == 2
    assert (ptc.num_batch_norm_update_epochs, ptc.num_observer_update_epochs) == (0, 2)


def test_batch_norm_freezes_after_its_epochs() -> None:
    data = batches(SHAPE, 2)
    w = QATFxModule(seeded(TinyCNN()), total_epochs=4, num_batch_norm_update_epochs=1,
                    num_observer_update_epochs=4, example_inputs=data[0])
    bn = _conv_bn(w).bn
    _run_epoch(w, data)
    after_first = bn.running_mean.clone()
    assert not w.bn_frozen
    _run_epoch(w, data)
    assert w.bn_frozen and not bn.training
    torch.testing.assert_close(bn.running_mean, after_first, rtol=0, atol=0)


def test_observers_freeze_after_their_epochs() -> None:
    data = batches(SHAPE, 2)
    w = QATFxModule(seeded(TinyCNN()), total_epochs=4, num_batch_norm_update_epochs=4,
                    num_observer_update_epochs=1, example_inputs=data[0])
    _run_epoch(w, data)
    scales = [fq.scale.clone() for fq in _fqs(w)]
    w.train()
    for fq in _fqs(w):
        assert fq.observer_enabled.item() == 0
    w(data[0] * 10)  # data far outside the calibrated range must not move a scale
    for fq, before in zip(_fqs(w), scales, strict=True):
        torch.testing.assert_close(fq.scale, before, rtol=0, atol=0)


def test_explicit_zero_means_frozen_from_the_start() -> None:
    data = batches(SHAPE, 1)
    w = QATFxModule(seeded(TinyCNN()), total_epochs=10, num_batch_norm_update_epochs=0,
                    num_observer_update_epochs=0, example_inputs=data[0])
    bn = _conv_bn(w).bn
    before = bn.running_mean.clone()
    w.train()
    assert w.bn_frozen and w.observers_frozen
    w(data[0])
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    assert all(fq.observer_enabled.item() == 0 for fq in _fqs(w))


def test_eval_freezes_both_and_puts_the_inner_module_in_eval_mode() -> None:
    data = batches(SHAPE, 1)
    w = QATFxModule(seeded(TinyCNN()), total_epochs=10, example_inputs=data[0])
    w.train()
    assert not w.bn_frozen and not w.observers_frozen
    w.eval()
    assert w.bn_frozen and w.observers_frozen
    assert not any(m.training for m in w.module.modules())
    assert all(fq.observer_enabled.item() == 0 for fq in _fqs(w))


def test_eval_on_the_inner_module_is_really_eval() -> None:
    w = QATFxModule(seeded(TinyCNN()), total_epochs=10, example_inputs=torch.randn(SHAPE))
    w.train()
    w.module.eval()
    assert not w.module.training
    assert not any(m.training for m in w.module.modules())


def test_train_after_eval_restores_the_epoch_state() -> None:
    data = batches(SHAPE, 1)
    w = QATFxModule(seeded(TinyCNN()), total_epochs=10, example_inputs=data[0])
    w.train()
    w.eval()
    w.train()  # epoch 1 of 10: BN (4 epochs) and observers (6) update again
    assert not w.bn_frozen and not w.observers_frozen
    assert all(fq.observer_enabled.item() == 1 for fq in _fqs(w))


@pytest.mark.parametrize("epochs", [0, None])
def test_qat_without_epochs_is_a_clear_error(epochs: int | None) -> None:
    with pytest.raises(UsageError, match="total_epochs > 0"):
        QATFxModule(seeded(TinyCNN()), total_epochs=epochs)


def test_negative_update_epochs_rejected() -> None:
    with pytest.raises(UsageError, match="num_observer_update_epochs"):
        PTCFxModule(seeded(TinyCNN()), num_observer_update_epochs=-1)


# --- inputs --------------------------------------------------------------------------------------------------------


def test_example_inputs_optional_prepares_on_first_forward() -> None:
    model = seeded(TinyCNN())
    x = torch.randn(SHAPE)
    expected = model(x)
    w = PTCFxModule(model)
    assert not w.is_prepared
    w.train()
    w(x)
    assert w.is_prepared and _fqs(w)
    w.eval()
    torch.testing.assert_close(w(x), expected, atol=0.1, rtol=0.1)


def test_tuple_inputs() -> None:
    model = seeded(TwoInputNet())
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    expected = model(a, b)
    w = PTCFxModule(model, example_inputs=(a, b))
    w.train()
    w(a, b)
    w.eval()
    torch.testing.assert_close(w(a, b), expected, atol=0.05, rtol=0.05)


def test_dict_inputs_are_keyword_arguments() -> None:
    model = seeded(TwoInputNet())
    inputs = {"image": torch.randn(3, 4), "extra": torch.randn(3, 4)}
    expected = model(**inputs)
    w = PTCFxModule(model, example_inputs=inputs)
    w.train()
    w(**inputs)
    w.eval()
    torch.testing.assert_close(w(**inputs), expected, atol=0.05, rtol=0.05)


def test_unusable_example_inputs_type() -> None:
    with pytest.raises(UsageError, match="example_inputs must be"):
        PTCFxModule(seeded(TinyCNN()), example_inputs=3.0)


# --- memory, devices, logging --------------------------------------------------------------------------------------


def test_no_copy_of_the_model_weights() -> None:
    model = seeded(TinyCNN())
    params = {id(p) for p in model.parameters()}
    storages = {p.data_ptr() for p in model.parameters()}
    w = QATFxModule(model, total_epochs=2, example_inputs=torch.randn(SHAPE))
    wrapped = list(w.parameters())
    assert {id(p) for p in wrapped} == params
    assert {p.data_ptr() for p in wrapped} == storages
    assert not any(m is model for m in w.modules())  # the original container itself is not kept


@pytest.mark.parametrize("device", DEVICES)
def test_runs_where_the_model_is(device: str) -> None:
    model = seeded(TinyCNN()).to(device)
    data = [x.to(device) for x in batches(SHAPE, 2)]
    w = QATFxModule(model, total_epochs=2, example_inputs=data[0])
    opt = torch.optim.SGD(w.parameters(), lr=1e-3)
    w.train()
    for x in data:
        opt.zero_grad()
        w(x).sum().backward()
        opt.step()
    w.eval()
    assert w(data[0]).device.type == device
    assert all(b.device.type == device for b in w.module.buffers())


def test_logs_and_never_prints(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tiexport")
    w = PTCFxModule(seeded(TinyCNN()), example_inputs=torch.randn(SHAPE))
    _run_epoch(w, batches(SHAPE, 1))
    w.eval()
    w.convert()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert "prepared TinyCNN with WC8_AT8" in caplog.text


# --- PTC, QAT, convert ---------------------------------------------------------------------------------------------


def test_ptc_calibration_needs_no_gradients() -> None:
    w = PTCFxModule(seeded(TinyCNN()), example_inputs=torch.randn(SHAPE))
    w.train()
    assert not w(torch.randn(SHAPE)).requires_grad


def test_ptc_keeps_dropout_off_while_calibrating() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    # frozen observers and no bias calibration: only dropout could make two calls differ
    w = PTCFxModule(model, example_inputs=torch.randn(2, 4), num_observer_update_epochs=0, bias_calibration_factor=0)
    w.train()
    x = torch.randn(2, 4)
    torch.testing.assert_close(w(x), w(x))


def test_convert_matches_fake_quant_within_one_step() -> None:
    data = batches(SHAPE, 3)
    w = PTCFxModule(seeded(TinyCNN()), example_inputs=data[0])
    for _ in range(2):
        _run_epoch(w, data)
    w.eval()
    x = torch.randn(SHAPE)
    fake = w(x)
    step = list(w.module.graph.nodes)[-2]
    scale = w.module.get_submodule(step.target).scale.item()
    assert w.convert() is w
    assert not _fqs(w)
    integer = w(x)
    assert (integer - fake).abs().max().item() <= scale + 1e-6


def test_convert_before_prepare_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="prepared"):
        PTCFxModule(seeded(TinyCNN())).convert()


def test_qat_trains() -> None:
    torch.manual_seed(0)
    data = batches((16, 1, 6, 6), 4)
    targets = [torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    w = QATFxModule(seeded(TinyCNN()), total_epochs=3, example_inputs=data[0])
    opt = torch.optim.Adam(w.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        w.train()
        total = 0.0
        for x, t in zip(data, targets, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(w(x), t)
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total)
    assert losses[-1] < losses[0]


def _mean_output_bias(factor: float) -> float:
    model = seeded(TinyCNN(channels=8, classes=10))
    reference = copy.deepcopy(model)  # the test keeps the float model; the wrapper does not
    data = batches((16, 1, 8, 8), 8, seed=3)
    w = PTCFxModule(model, qconfig_type="WC8_AT8", example_inputs=data[0], bias_calibration_factor=factor)
    for _ in range(2):
        _run_epoch(w, data)
    w.eval()
    held_out = batches((64, 1, 8, 8), 4, seed=9)
    with torch.no_grad():
        per_channel = torch.stack([(w(x) - reference(x)).mean(0) for x in held_out]).mean(0)
    return per_channel.abs().mean().item()


def test_bias_calibration_reduces_mean_output_error() -> None:
    without = _mean_output_bias(0.0)
    with_calibration = _mean_output_bias(0.1)
    assert with_calibration < 0.8 * without


def test_ptc_bias_calibration_float_pass_uses_the_uncorrected_biases() -> None:
    model = seeded(TinyCNN(channels=8, classes=10))
    data = batches((16, 1, 8, 8), 4, seed=3)
    w = PTCFxModule(model, qconfig_type="WC8_AT8", example_inputs=data[0], bias_calibration_factor=0.1)
    calibrator = w._bias_calibrator
    assert calibrator is not None and calibrator.targets
    target = calibrator.targets[0]
    original = target.bias.detach().clone()
    seen: list[torch.Tensor] = []
    # the float pass runs with the fake-quants bypassed: record the bias the layer sees then
    hook = target.fake_quant.register_forward_pre_hook(
        lambda m, args: seen.append(target.bias.detach().clone()) if m.bypass else None)
    _run_epoch(w, data)
    hook.remove()
    assert len(seen) == len(data)
    assert all(torch.equal(b, original) for b in seen)  # every float pass: the float model's own bias
    assert not torch.equal(target.bias.detach(), original)  # while the corrections did accumulate


def test_ptc_and_qat_run_under_inference_mode_as_under_no_grad() -> None:
    # inference tensors keep no version counters, which the weight and folded-weight reuse reads
    data = batches((16, 1, 8, 8), 3, seed=5)
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        w = PTCFxModule(seeded(TinyCNN(channels=8, classes=10)), example_inputs=data[0])
        w.train()
        with mode():
            for x in data:
                w(x)
        w.eval()
        with mode():
            outs.append(w(data[0]).clone())
    assert torch.equal(outs[0], outs[1])
    q = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=2, example_inputs=data[0])
    q.train()
    with torch.inference_mode():
        q(data[0])  # batch norm updating
    q.freeze()
    with torch.inference_mode():
        assert q(data[0]).shape == outs[0].shape


# --- transformer block ---------------------------------------------------------------------------------------------


def test_transformer_block_ptc_qat_convert() -> None:
    from fixtures.torch_models import TransformerBlock

    torch.manual_seed(0)
    model = TransformerBlock(dim=16, heads=2, num_classes=4).eval()
    data = [torch.randn(2, 5, 16) for _ in range(3)]
    expected = model(data[0])
    ptc = PTCFxModule(model, example_inputs=data[0])
    for _ in range(2):
        _run_epoch(ptc, data)
    ptc.eval()
    fake = ptc(data[0])
    assert (fake - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    ops = {n.target for n in ptc.module.graph.nodes if n.op == "call_function"}
    assert torch.matmul in ops and torch.softmax in ops
    # QAT from the calibrated state: a few steps with the PTC checkpoint loaded
    qat_model = TransformerBlock(dim=16, heads=2, num_classes=4)
    qat = QATFxModule(qat_model, total_epochs=2, example_inputs=data[0])
    report = __import__("tiexport").load_weights(qat, ptc.module.state_dict())
    assert report.complete, report.summary()
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    qat.train()
    for x in data:
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    qat.eval()
    before = qat(data[0])
    qat.convert()
    after = qat(data[0])
    assert (after - before).abs().max().item() < 0.05


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_swap_computes_the_same_function(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    swap = QuantFriendlyMultiheadAttention(mha).eval()
    x, y = torch.randn(3, 5, 8), torch.randn(3, 4, 8)  # batch 3, 5 queries, 4 keys
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, -1] = True
    for args in ((x, x, x), (x, y, y)):
        kpm = None if args[1] is x else mask
        expected, expected_w = mha(*args, key_padding_mask=kpm)
        got, got_w = swap(*args, key_padding_mask=kpm)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, expected_w, atol=1e-5, rtol=1e-5)


def test_multihead_attention_is_quantized_after_wrapping() -> None:
    torch.manual_seed(0)
    model = MHANet().eval()
    weight = model.attn.in_proj_weight
    x = torch.randn(2, 5, 8)
    expected = model(x)
    w = PTCFxModule(model, example_inputs=x)
    _run_epoch(w, [x])
    w.eval()
    matmuls = [n for n in w.module.graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    assert len(matmuls) == 2
    assert any(p is weight for p in w.parameters())  # the swap shares the Parameter, no copy
    assert (w(x) - expected).abs().max().item() < 0.1


# --- load_weights --------------------------------------------------------------------------------------------------


def _calibrated_state() -> dict[str, torch.Tensor]:
    data = batches(SHAPE, 2)
    w = PTCFxModule(seeded(TinyCNN()), example_inputs=data[0])
    _run_epoch(w, data)
    w.eval()
    return {k: v.clone() for k, v in w.module.state_dict().items()}


def test_load_weights_loads_a_calibrated_checkpoint_into_a_fresh_wrapper() -> None:
    from tiexport import load_weights

    state = _calibrated_state()
    fresh = QATFxModule(seeded(TinyCNN(), seed=5), total_epochs=2, example_inputs=torch.randn(SHAPE))
    report = load_weights(fresh, state)
    assert report.complete, report.summary()
    for key, value in fresh.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_load_weights_reports_missing_unexpected_and_shape_mismatched_keys() -> None:
    from tiexport import load_weights

    state = _calibrated_state()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["fc.weight"] = torch.zeros(7, 7)
    fresh = PTCFxModule(seeded(TinyCNN()), example_inputs=torch.randn(SHAPE))
    before = fresh.module.fc.weight.detach().clone()
    report = load_weights(fresh, state)
    assert report.missing == ["fc.bias"]  # a shape-mismatched key is reported as such, not also as missing
    assert report.unexpected == ["extra.weight"]
    assert report.shape_mismatched == [("fc.weight", (7, 7), tuple(before.shape))]
    torch.testing.assert_close(fresh.module.fc.weight, before)  # skipped, not half-loaded
    assert not report.complete


def test_load_weights_from_a_file_with_a_nested_ddp_state_dict(tmp_path: Path) -> None:
    from tiexport import load_weights

    state = {f"module.{k}": v for k, v in _calibrated_state().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    fresh = PTCFxModule(seeded(TinyCNN()), example_inputs=torch.randn(SHAPE))
    assert load_weights(fresh, path).complete


def test_load_weights_missing_file_is_an_unusable_input(tmp_path: Path) -> None:
    from tiexport import load_weights
    from tiexport.errors import UnusableInputError

    with pytest.raises(UnusableInputError, match="no such checkpoint"):
        load_weights(seeded(TinyCNN()), tmp_path / "nope.pth")
