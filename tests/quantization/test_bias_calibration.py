"""BiasCalibrator's recording: probes on tiexport's fake-quants and hooks on other fake-quants record the same
per-channel means, each at the call of a shared fake-quant module that follows its layer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tests.quantization._models import batches, seeded  # noqa: E402
from tiexport.quantization.bias_calibration import BiasCalibrator  # noqa: E402
from tiexport.quantization.fake_quantize import TidlFakeQuantize  # noqa: E402
from tiexport.wrappers import PTCFxModule  # noqa: E402


class ConcatNet(nn.Module):
    """Two biased convs into a concat (tiexport's qconfigs put concat inputs on one scale: both convs' outputs go
    through one shared fake-quant module, called twice per pass), then a biased linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.cat([self.a(x), self.b(x)], 1), 1))


def _independent_means(calibrator: BiasCalibrator, which: str, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The same means from plain forward hooks that count calls themselves."""
    means: dict[int, torch.Tensor] = {}
    calls: dict[int, int] = {}
    handles = []
    modules = {id(t.fake_quant): t.fake_quant for t in calibrator.targets}
    for module in modules.values():
        def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            call = calls.get(id(m), 0)
            calls[id(m)] = call + 1
            for index, t in enumerate(calibrator.targets):
                if t.fake_quant is m and t.call_index == call:
                    value = inputs[0] if which == "input" else output
                    dims = [d for d in range(value.dim()) if d != t.channel_dim % value.dim()]
                    means[index] = value.detach().mean(dim=dims)
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        calibrator.graph_module(x)
    for h in handles:
        h.remove()
    return means


@pytest.mark.parametrize("user_qconfig", [False, True])
def test_recorded_means_equal_independent_hooks(user_qconfig: bool) -> None:
    data = batches((8, 1, 6, 6), 2, seed=4)
    kwargs = {}
    if user_qconfig:
        from torch.ao.quantization import get_default_qat_qconfig_mapping

        kwargs["qconfig_type"] = get_default_qat_qconfig_mapping("qnnpack")
    w = PTCFxModule(seeded(ConcatNet()), example_inputs=data[0], bias_calibration_factor=0.01, **kwargs)
    w.train()
    w(data[0])  # calibrate once: ranges set
    calibrator = w._bias_calibrator
    assert calibrator is not None and len(calibrator.targets) == 3
    fake_quants = {type(t.fake_quant) for t in calibrator.targets}
    assert (TidlFakeQuantize in fake_quants) is not user_qconfig  # probes for ours, hooks for torch's
    a, b = (next(t for t in calibrator.targets if t.name == name) for name in ("a", "b"))
    if not user_qconfig:  # one fake-quant module for both concat inputs: a is its first call, b its second
        assert a.fake_quant is b.fake_quant and (a.call_index, b.call_index) == (0, 1)
    for m in w.module.modules():
        if hasattr(m, "disable_observer"):
            m.disable_observer()
    for which in ("input", "output"):
        means, handles = calibrator._record(which)
        with torch.no_grad():
            calibrator.graph_module(data[1])
        for h in handles:
            h.remove()
        expected = _independent_means(calibrator, which, data[1])
        assert means.keys() == expected.keys() == {0, 1, 2}
        for index in means:
            assert torch.allclose(means[index], expected[index], atol=1e-6, rtol=1e-5), (which, index)
    # handles removed: nothing records any more
    assert all(getattr(t.fake_quant, "probe", None) is None for t in calibrator.targets)
    assert all(not t.fake_quant._forward_hooks for t in calibrator.targets)
