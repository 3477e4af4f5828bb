"""The fused QAT ops (tiexport.quantization.fused) compute what the unfused path computes, bit for bit: outputs,
gradients and every buffer, for every qconfig type, per-tensor and per-channel, observers live and frozen, range
shrink on and off; and a training step dispatches one op per fake-quant point."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tests.quantization._models import TinyCNN, batches, seeded  # noqa: E402
from tiexport.quantization import fused  # noqa: E402
from tiexport.quantization.fake_quantize import TidlFakeQuantize  # noqa: E402
from tiexport.quantization.observers import ActivationObserver, WeightObserver  # noqa: E402
from tiexport.quantization.qconfig import QCONFIG_TYPES  # noqa: E402
from tiexport.wrappers import QATFxModule  # noqa: E402


def _train(model: nn.Module, data: list[torch.Tensor], labels: torch.Tensor, use_fused: bool,
           monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Three SGD steps; the outputs of each, with the gradients of the last step left on the parameters."""
    monkeypatch.setattr(fused, "FUSED_OPS", use_fused)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = []
    for x in data:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        nn.functional.cross_entropy(out, labels).backward()
        outs.append(out.detach())
        if x is not data[-1]:
            opt.step()
    return outs


def _assert_same(a: nn.Module, b: nn.Module, outs_a: list[torch.Tensor], outs_b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(outs_a, outs_b, strict=True)):
        assert torch.equal(x, y), f"output of step {i}"
    params_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, params_b[name]), name
        assert (p.grad is None) == (params_b[name].grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, params_b[name].grad), f"gradient of {name}"
    buffers_b = dict(b.named_buffers())
    for name, buf in a.named_buffers():
        assert torch.equal(buf, buffers_b[name]), name


def _count_fused_ops(run: Callable[[], object]) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts: dict[str, int] = {}
    for event in prof.profiler.function_events:
        if event.name.startswith(f"{fused.NAMESPACE}::"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


@pytest.mark.parametrize("qconfig_type", sorted(QCONFIG_TYPES))
@pytest.mark.parametrize("state", ["live", "observers frozen", "bn and observers frozen"])
def test_fused_training_equals_the_unfused_path(qconfig_type: str, state: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = batches((16, 1, 8, 8), 3, seed=11)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(11))
    reference = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=4, qconfig_type=qconfig_type,
                            example_inputs=data[0])
    reference.train()
    if state != "live":
        reference(data[0])  # observe once, then freeze
        reference.freeze(freeze_bn=state == "bn and observers frozen", freeze_observers=True)
    candidate = copy.deepcopy(reference)
    expected = _train(reference, data, labels, False, monkeypatch)
    got = _train(candidate, data, labels, True, monkeypatch)
    _assert_same(reference, candidate, expected, got)


@pytest.mark.parametrize("percentile", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("qconfig_type", ["WC8_AT8", "WT8SYMP2_AT8SYMP2"])
def test_fused_training_equals_the_unfused_path_with_range_shrink(qconfig_type: str, percentile: float,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = batches((32, 1, 8, 8), 3, seed=12)
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(12))
    reference = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=4, qconfig_type=qconfig_type,
                            example_inputs=data[0], range_shrink_percentile=percentile)
    reference.train()
    candidate = copy.deepcopy(reference)
    expected = _train(reference, data, labels, False, monkeypatch)
    got = _train(candidate, data, labels, True, monkeypatch)
    _assert_same(reference, candidate, expected, got)


@pytest.mark.parametrize("aggregation", ["max", "mean"])
@pytest.mark.parametrize(("symmetric", "power_of_2", "force_signed"),
                         [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
                          (True, False, True)])
@pytest.mark.parametrize("percentile", [0.0, 0.01, 1.0])
def test_fused_activation_op_equals_the_unfused_fake_quant(aggregation: str, symmetric: bool, power_of_2: bool,
                                                           force_signed: bool, percentile: float,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def make() -> TidlFakeQuantize:
        return TidlFakeQuantize(observer=ActivationObserver, symmetric=symmetric, power_of_2=power_of_2,
                                force_signed=force_signed, range_shrink_percentile=percentile,
                                range_aggregation=aggregation)

    reference, candidate = make(), make()
    g = torch.Generator().manual_seed(int(percentile * 100) + 7 * symmetric + 3 * power_of_2 + 13 * force_signed)
    for step in range(12):
        if step == 8:  # frozen observers: the op reads the qparams written so far
            reference.disable_observer()
            candidate.disable_observer()
        x = torch.randn(4, 3, 7, 9, generator=g) * (0.2 + step / 3)
        if step % 3 == 0:
            x = x.abs() + 0.1 * step  # non-negative: uint8 for a symmetric observer that has seen nothing negative
        results = []
        for fq, use_fused in ((reference, False), (candidate, True)):
            monkeypatch.setattr(fused, "FUSED_OPS", use_fused)
            xr = x.clone().requires_grad_()
            out = fq(xr)
            (out * torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)).sum().backward()
            results.append((out.detach(), xr.grad))
        (out_a, grad_a), (out_b, grad_b) = results
        assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b), step
        for (name, a), (_, b) in zip(reference.named_buffers(), candidate.named_buffers(), strict=True):
            assert torch.equal(a, b), (step, name)
        assert (reference.activation_post_process._seen_data == candidate.activation_post_process._seen_data)


@pytest.mark.parametrize(("per_channel", "ch_axis"), [(True, 0), (True, 1), (False, 0)])
@pytest.mark.parametrize("power_of_2", [False, True])
def test_fused_weight_op_equals_the_unfused_fake_quant(per_channel: bool, ch_axis: int, power_of_2: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric

    def make() -> TidlFakeQuantize:
        return TidlFakeQuantize(observer=WeightObserver, per_channel=per_channel, ch_axis=ch_axis,
                                power_of_2=power_of_2, dtype=torch.qint8, quant_min=-128, quant_max=127,
                                qscheme=qscheme)

    reference, candidate = make(), make()
    g = torch.Generator().manual_seed(3 + power_of_2 + 5 * ch_axis)
    w = torch.randn(6, 5, 3, 3, generator=g)
    for step in range(6):
        if step == 4:
            reference.disable_observer()
            candidate.disable_observer()
        results = []
        for fq, use_fused in ((reference, False), (candidate, True)):
            monkeypatch.setattr(fused, "FUSED_OPS", use_fused)
            wr = (w * (1 + step / 5)).requires_grad_()
            out = fq(wr)
            (out * torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)).sum().backward()
            results.append((out.detach(), wr.grad))
        (out_a, grad_a), (out_b, grad_b) = results
        assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b), step
        for (name, a), (_, b) in zip(reference.named_buffers(), candidate.named_buffers(), strict=True):
            assert torch.equal(a, b), (step, name)


def _fake_quant_calls(w: QATFxModule) -> int:
    """Fake-quant calls in one forward: the graph's calls of fake-quant modules and one per quantized weight."""
    graph_module = w.module
    calls = sum(1 for n in graph_module.graph.nodes
                if n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), TidlFakeQuantize))
    return calls + sum(1 for m in graph_module.modules() if isinstance(getattr(m, "weight_fake_quant", None),
                                                                       TidlFakeQuantize))


@pytest.mark.parametrize("state", ["live", "frozen"])
def test_training_step_dispatches_one_fused_op_per_fake_quant_call(state: str) -> None:
    data = batches((16, 1, 8, 8), 2, seed=13)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(13))
    w = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=4, example_inputs=data[0])
    w.train()
    if state == "frozen":
        w(data[0])
        w.freeze(freeze_bn=True, freeze_observers=True)
    counts = _count_fused_ops(lambda: nn.functional.cross_entropy(w(data[1]), labels).backward())
    forward = {name: n for name, n in counts.items() if not name.endswith("_backward")}
    assert sum(forward.values()) == _fake_quant_calls(w) == 10, counts
    # Conv+BN weights take the folded-weight op while batch norm updates, the frozen folding op once it is frozen;
    # their backward is one op too
    op = "conv_bn_weight" if state == "live" else "conv_bn_frozen"
    assert counts.get(f"{fused.NAMESPACE}::{op}", 0) == 2, counts
    assert counts.get(f"{fused.NAMESPACE}::{op}_backward", 0) == 2, counts


@pytest.mark.parametrize("qconfig_type", ["WC8_AT8", "WT8SYMP2_AT8SYMP2", "MSA_WC8P2_AT8P2"])
def test_fused_ptc_calibration_and_evaluation_equal_the_unfused_path(qconfig_type: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tiexport.wrappers import PTCFxModule

    data = batches((16, 1, 8, 8), 3, seed=14)
    reference = PTCFxModule(seeded(TinyCNN(channels=8, classes=10)), qconfig_type=qconfig_type,
                            example_inputs=data[0], bias_calibration_factor=0.01)
    candidate = copy.deepcopy(reference)
    outs: list[list[torch.Tensor]] = []
    for model, use_fused in ((reference, False), (candidate, True)):
        monkeypatch.setattr(fused, "FUSED_OPS", use_fused)
        got = []
        for _ in range(model.total_epochs):
            model.train()
            with torch.no_grad():
                got += [model(x) for x in data]
                assert _count_fused_ops(lambda model=model: model(data[0])) == {}  # without autograd: unfused
        model.eval()
        with torch.no_grad():
            got.append(model(data[0]))
        outs.append(got)
    _assert_same(reference, candidate, outs[0], outs[1])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_after_fused_training_has_no_fused_op(exporter: str, tmp_path: object) -> None:
    import onnx

    from tiexport import compat

    if exporter == "dynamo" and not compat.has_dynamo_exporter():
        pytest.skip("no dynamo exporter")
    data = batches((16, 1, 8, 8), 2, seed=15)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(15))
    w = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=1, example_inputs=data[0])
    w.train()
    for x in data:
        nn.functional.cross_entropy(w(x), labels).backward()
    w.eval()
    path = f"{tmp_path}/m.onnx"
    w.export(data[0][:1], path, exporter=exporter)
    model = onnx.load(path)
    assert all(n.domain != fused.NAMESPACE and "tiexport_qat" not in n.op_type for n in model.graph.node)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}


def test_fused_conv_bn_weight_with_a_frozen_batch_norm_scale_equals_the_unfused_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = batches((16, 1, 8, 8), 3, seed=16)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(16))
    reference = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=4, example_inputs=data[0])
    for name, p in reference.named_parameters():
        if name.endswith("bn.weight"):
            p.requires_grad_(False)  # gamma not trained: only W's gradient through the folded weight
    reference.train()
    candidate = copy.deepcopy(reference)
    expected = _train(reference, data, labels, False, monkeypatch)
    got = _train(candidate, data, labels, True, monkeypatch)
    _assert_same(reference, candidate, expected, got)
    assert any(n.endswith("bn.weight") and p.grad is None for n, p in candidate.named_parameters())


@pytest.mark.parametrize("bn_frozen", [False, True])
def test_fused_conv_bn_without_conv_bias_equals_the_unfused_path(bn_frozen: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = batches((16, 1, 8, 8), 3, seed=17)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(17))
    model = seeded(TinyCNN(channels=8, classes=10))
    model.conv1.bias = None  # type: ignore[assignment]  # the bench models' convolutions have no bias
    reference = QATFxModule(model, total_epochs=4, qconfig_type="WC8SYMP2_AT8SYMP2", example_inputs=data[0])
    reference.train()
    if bn_frozen:
        reference.freeze(freeze_bn=True, freeze_observers=False)  # statistics frozen, observers live
    candidate = copy.deepcopy(reference)
    expected = _train(reference, data, labels, False, monkeypatch)
    got = _train(candidate, data, labels, True, monkeypatch)
    _assert_same(reference, candidate, expected, got)
