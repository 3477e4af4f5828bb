"""Cross-layer equalization: which layer pairs, the float function unchanged, ranges evened, and what it buys for
per-tensor power-of-2 weights (TDA4VM's WT8SYMP2_AT8SYMP2)."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.ao.quantization.fake_quantize import FakeQuantizeBase  # noqa: E402

from fixtures.torch_models import SmallCNN  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402
from tiexport.quantization.equalization import (  # noqa: E402
    _in_ranges,
    _out_ranges,
    equalize_cross_layer,
    find_pairs,
)
from tiexport.wrappers import PTCFxModule, QATFxModule  # noqa: E402


def _inputs(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(16, 1, 8, 8, generator=g) for _ in range(n)]


def _prepared(model: nn.Module, **kwargs: object) -> PTCFxModule:
    return PTCFxModule(model, qconfig_type="WT8SYMP2_AT8SYMP2", example_inputs=(_inputs(1)[0],), **kwargs)


def _float_outputs(gm: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    saved = [(m.fake_quant_enabled.clone(), m.observer_enabled.clone())
             for m in gm.modules() if isinstance(m, FakeQuantizeBase)]
    for m in gm.modules():
        if isinstance(m, FakeQuantizeBase):
            m.disable_fake_quant()
            m.disable_observer()
    training = gm.training
    gm.eval()
    with torch.no_grad():
        out = [gm(x) for x in xs]
    gm.train(training)
    for m, (fq, obs) in zip([m for m in gm.modules() if isinstance(m, FakeQuantizeBase)], saved, strict=True):
        m.fake_quant_enabled.copy_(fq)
        m.observer_enabled.copy_(obs)
    return out


def _unbalanced_small_cnn(seed: int = 0) -> SmallCNN:
    """SmallCNN whose stem channels differ in scale by 100x, compensated in the depthwise filters: the same float
    function, but a depthwise layer one per-tensor weight scale cannot serve."""
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, width=8).eval()
    factor = torch.ones(8)
    factor[::2] = 0.01
    with torch.no_grad():
        model.stem[1].weight.mul_(factor)
        model.stem[1].bias.mul_(factor)
        model.dw[0].weight.div_(factor.reshape(-1, 1, 1, 1))
    return model


def test_small_cnn_pairs_are_the_chains_without_a_residual_or_concat() -> None:
    w = _prepared(SmallCNN(in_channels=1, width=8), cross_layer_equalization=False)
    # pw.0 feeds the residual Add and res.0; res.0 feeds the Add; fuse.0 reaches fc through pooling and flatten
    assert find_pairs(w.module) == [("stem.0", "dw.0"), ("dw.0", "pw.0"), ("fuse.0", "fc")]


def test_a_non_homogeneous_op_between_layers_breaks_the_pair() -> None:
    class Net(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Conv2d(1, 4, 3), act, nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(x)))

    assert find_pairs(_prepared(Net(nn.MaxPool2d(2)), cross_layer_equalization=False).module) == [("a", "b")]
    assert find_pairs(_prepared(Net(nn.LeakyReLU(0.1)), cross_layer_equalization=False).module) == [("a", "b")]
    assert find_pairs(_prepared(Net(nn.ReLU6()), cross_layer_equalization=False).module) == []
    assert find_pairs(_prepared(Net(nn.GELU()), cross_layer_equalization=False).module) == []


def test_the_float_function_is_unchanged() -> None:
    w = _prepared(_unbalanced_small_cnn(), cross_layer_equalization=False)
    xs = _inputs()
    before = _float_outputs(w.module, xs)
    report = equalize_cross_layer(w.module, power_of_2_grid=127.0)
    after = _float_outputs(w.module, xs)
    assert report.pairs and report.max_scale > 10  # it did move channels (the unbalanced ones by ~10x)
    for b, a in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_each_pair_ends_with_equal_channel_ranges() -> None:
    w = _prepared(_unbalanced_small_cnn(), cross_layer_equalization=False)
    modules = dict(w.module.named_modules())
    a, b = modules["stem.0"], modules["dw.0"]
    spread_before = float(_out_ranges(a).max() / _out_ranges(a).min())
    equalize_cross_layer(w.module)  # no power-of-2 grid: r1 == r2 channel by channel at the fixed point
    r1, r2 = _out_ranges(a), _in_ranges(b)
    assert torch.allclose(r1, r2, rtol=1e-2)
    assert float(r1.max() / r1.min()) < spread_before / 10


def test_power_of_2_grid_puts_each_first_layer_on_the_grid() -> None:
    w = _prepared(_unbalanced_small_cnn(), cross_layer_equalization=False)
    report = equalize_cross_layer(w.module, power_of_2_grid=127.0)
    modules = dict(w.module.named_modules())
    from tiexport.quantization.kernels import power_of_2_ceil

    for a_name, _ in report.pairs:
        scale = _out_ranges(modules[a_name]).max().reshape(1) / 127.0  # the weight observer's float32 scale
        p2 = power_of_2_ceil(scale)
        # just below a power of two, never above (which would double the step): the ceiling wastes nothing
        assert float(scale) <= float(p2) < float(scale) * (1 + 1e-4), a_name


def _ptc_sqnr(model: nn.Module, equalize: bool) -> float:
    w = _prepared(model, cross_layer_equalization=equalize)
    xs = _inputs(8)
    reference = _float_outputs(w.module, xs)
    for _ in range(2):
        w.train()
        for x in xs:
            w(x)
    w.eval()
    with torch.no_grad():
        quant = [w(x) for x in xs]
    signal = sum(float((r**2).sum()) for r in reference)
    noise = sum(float(((q - r) ** 2).sum()) for q, r in zip(quant, reference, strict=True))
    return 10 * math.log10(signal / noise)


def test_equalization_recovers_per_tensor_quantization_of_unbalanced_channels() -> None:
    model = _unbalanced_small_cnn()
    without = _ptc_sqnr(copy.deepcopy(model), False)
    with_cle = _ptc_sqnr(copy.deepcopy(model), True)
    assert with_cle > without + 3.0, (with_cle, without)


def test_wrapper_default_is_on_for_per_tensor_weights_only() -> None:
    x = (_inputs(1)[0],)
    assert PTCFxModule(SmallCNN(1, width=8), "WT8SYMP2_AT8SYMP2", example_inputs=x).equalization is not None
    assert QATFxModule(SmallCNN(1, width=8), 2, "WT8SYMP2_AT8SYMP2", example_inputs=x).equalization is not None
    assert PTCFxModule(SmallCNN(1, width=8), "WC8_AT8", example_inputs=x).equalization is None
    forced = PTCFxModule(SmallCNN(1, width=8), "WC8_AT8", example_inputs=x, cross_layer_equalization=True)
    assert forced.equalization is not None and forced.equalization.pairs


def test_wrapper_rejects_a_non_bool_setting() -> None:
    with pytest.raises(UsageError, match="cross_layer_equalization"):
        PTCFxModule(SmallCNN(1, width=8), cross_layer_equalization="yes")  # type: ignore[arg-type]


def test_batch_norm_without_running_statistics_is_a_one_line_error() -> None:
    # torch.ao refuses to fuse such a batch norm with a bare assert; the wrapper says so in one line
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.bn(self.a(x))))

    with pytest.raises(UsageError, match="tracking_running_stats") as info:
        PTCFxModule(Net(), "WT8SYMP2_AT8SYMP2", example_inputs=(_inputs(1)[0],))
    assert "\n" not in str(info.value)


def test_first_layer_without_foldable_batch_norm_is_not_equalized() -> None:
    from tiexport.quantization.equalization import _can_scale_outputs, _out_factor

    conv = nn.Conv2d(1, 4, 3)
    conv.bn = nn.BatchNorm2d(4, track_running_stats=False)  # what a QAT Conv+BN would hold
    assert _out_factor(conv) is None
    assert "running statistics" in _can_scale_outputs(conv)
