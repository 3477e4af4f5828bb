"""Observers: power-of-2 scales, zero point 0 with data-driven uint8/int8, weight scales, range shrink vs full range."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tiexport.quantization import kernels  # noqa: E402
from tiexport.quantization.fake_quantize import TidlFakeQuantize  # noqa: E402
from tiexport.quantization.kernels import power_of_2_ceil  # noqa: E402
from tiexport.quantization.observers import ActivationObserver, WeightObserver  # noqa: E402


def _is_power_of_2(t: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(t.float())
    return bool((mantissa == 0.5).all())


def test_power_of_2_ceil_is_exact_and_never_smaller() -> None:
    s = torch.tensor([3e-5, 0.01, 0.0625, 0.3, 1.0, 7.9])
    p = power_of_2_ceil(s)
    assert _is_power_of_2(p)
    assert (p >= s).all() and (p < 2 * s).all()
    assert p[2].item() == 0.0625  # already a power of two: unchanged


def test_symmetric_non_negative_tensor_is_uint8_with_zero_point_0() -> None:
    obs = ActivationObserver(symmetric=True)
    obs(torch.rand(1000) * 5.1)
    scale, zp = obs.calculate_qparams()
    assert (obs.dtype, obs.quant_min, obs.quant_max) == (torch.quint8, 0, 255)
    assert zp.item() == 0
    assert scale.item() == pytest.approx(obs.max_val.item() / 255, rel=1e-6)


def test_symmetric_signed_tensor_is_int8_with_zero_point_0_not_128() -> None:
    obs = ActivationObserver(symmetric=True)
    obs(torch.linspace(-2.0, 3.0, 1001))
    scale, zp = obs.calculate_qparams()
    assert (obs.dtype, obs.quant_min, obs.quant_max) == (torch.qint8, -128, 127)
    assert zp.item() == 0
    assert scale.item() == pytest.approx(3.0 / 127, rel=1e-6)  # the larger end sets the scale, nothing clipped


def test_affine_activation_is_uint8_with_zero_point_covering_the_range() -> None:
    obs = ActivationObserver()
    obs(torch.linspace(-1.0, 3.0, 1001))
    scale, zp = obs.calculate_qparams()
    assert obs.dtype == torch.quint8
    assert scale.item() == pytest.approx(4.0 / 255, rel=1e-6)
    assert zp.item() == round(1.0 / scale.item())


@pytest.mark.parametrize("symmetric", [False, True])
def test_power_of_2_activation_scale_is_exact_power_of_2_and_covers_range(symmetric: bool) -> None:
    obs = ActivationObserver(symmetric=symmetric, power_of_2=True)
    obs(torch.linspace(-1.3, 2.7, 1001))
    scale, zp = obs.calculate_qparams()
    assert _is_power_of_2(scale)
    lo = (obs.quant_min - zp.item()) * scale.item()
    hi = (obs.quant_max - zp.item()) * scale.item()
    assert lo <= -1.3 + scale.item() / 2 and hi >= 2.7 - scale.item() / 2
    if symmetric:
        assert zp.item() == 0


def test_weight_observer_per_channel_axis_0_int8_symmetric() -> None:
    w = torch.randn(6, 3, 3, 3)
    w[2] *= 10
    obs = WeightObserver(per_channel=True)
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert obs.qscheme == torch.per_channel_symmetric and obs.ch_axis == 0
    assert (obs.dtype, obs.quant_min, obs.quant_max) == (torch.qint8, -128, 127)
    assert scale.shape == (6,) and (zp == 0).all()
    expected = w.abs().reshape(6, -1).amax(dim=1) / 127
    torch.testing.assert_close(scale, expected)


def test_weight_observer_per_tensor_power_of_2() -> None:
    w = torch.randn(6, 3, 3, 3)
    obs = WeightObserver(per_channel=False, power_of_2=True)
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert obs.qscheme == torch.per_tensor_symmetric
    assert scale.numel() == 1 and _is_power_of_2(scale) and zp.item() == 0
    assert scale.item() * 127 >= w.abs().max().item()


def test_weight_range_follows_current_weights_not_a_running_extreme() -> None:
    obs = WeightObserver(per_channel=False)
    obs(torch.full((4, 4), 2.0))
    obs(torch.full((4, 4), 1.0))
    assert obs.calculate_qparams()[0].item() == pytest.approx(1.0 / 127)


def _outlier_batches(n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(20000, generator=gen)
        x[:2] = 50.0  # 0.01 % of the values are huge outliers
        out.append(x)
    return out


def test_range_shrink_clips_outliers_that_full_range_keeps() -> None:
    shrink = ActivationObserver(range_shrink_percentile=0.1)
    full = ActivationObserver(range_shrink_percentile=0.0)
    for x in _outlier_batches():
        shrink(x)
        full(x)
    assert full.max_val.item() == 50.0
    assert shrink.max_val.item() < 5.0
    assert shrink.calculate_qparams()[0].item() < full.calculate_qparams()[0].item() / 8


def test_range_shrink_leaves_small_tensors_unclipped() -> None:
    obs = ActivationObserver(range_shrink_percentile=0.01)
    x = torch.linspace(-1, 1, 100)  # fewer than 100 / 0.01 % values: nothing to clip
    obs(x)
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 1.0)


def test_mean_aggregation_averages_per_batch_ranges() -> None:
    obs = ActivationObserver(range_aggregation="mean")
    obs(torch.tensor([0.0, 1.0]))
    obs(torch.tensor([0.0, 3.0]))
    assert obs.max_val.item() == pytest.approx(2.0)


def test_fake_quantize_follows_observer_dtype_and_range() -> None:
    fq = TidlFakeQuantize(observer=ActivationObserver, symmetric=True)
    fq(torch.rand(100))
    assert (fq.dtype, fq.quant_min, fq.quant_max) == (torch.quint8, 0, 255)
    fq(torch.rand(100) - 2)
    assert (fq.dtype, fq.quant_min, fq.quant_max) == (torch.qint8, -128, 127)
    assert fq.zero_point.item() == 0
    y = fq(torch.tensor([-1.0]))
    assert y.item() == pytest.approx(-1.0, abs=fq.scale.item())


def test_fake_quantize_is_not_the_fused_moving_average_kind() -> None:
    from torch.ao.quantization import FakeQuantize, FusedMovingAvgObsFakeQuantize

    fq = TidlFakeQuantize(observer=ActivationObserver)
    assert isinstance(fq, FakeQuantize) and not isinstance(fq, FusedMovingAvgObsFakeQuantize)


def test_unobserved_gives_unit_scale_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    obs = ActivationObserver()
    scale, zp = obs.calculate_qparams()
    assert (scale.item(), zp.item()) == (1.0, 0)
    assert "seen no data" in caplog.text


def test_invalid_percentile_rejected() -> None:
    with pytest.raises(ValueError, match="range_shrink_percentile"):
        ActivationObserver(range_shrink_percentile=60)


# ------------------------------------------------------------------------------------------- speed paths, exactness
@pytest.mark.parametrize("n,m", [(1_048_576, 105), (131_072, 14), (3_003, 2), (1_000, 400), (64, 32), (10, 1)])
def test_tail_values_equal_full_topk(n: int, m: int) -> None:
    from tiexport.quantization.kernels import tail_values as _tail_values

    g = torch.Generator().manual_seed(n + m)
    for flat in (torch.randn(n, generator=g), torch.randint(-3, 4, (n,), generator=g).float(),  # many ties
                 torch.relu(torch.randn(n, generator=g)).sort().values):  # sorted: the extremes share groups
        lo, hi = _tail_values(flat, m)
        assert lo.item() == torch.topk(flat, m, largest=False).values[-1].item()
        assert hi.item() == torch.topk(flat, m).values[-1].item()


def test_range_shrink_of_a_large_tensor_is_the_exact_percentile() -> None:
    obs = ActivationObserver(range_shrink_percentile=0.01)
    x = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    obs(x)
    flat = x.reshape(-1)
    k = int(flat.numel() * 0.01 / 100)  # exactly k values lie beyond each end
    assert obs.min_val.item() == torch.topk(flat, k + 1, largest=False).values[-1].item()
    assert obs.max_val.item() == torch.topk(flat, k + 1).values[-1].item()


@pytest.mark.parametrize(("symmetric", "signed_data"), [(False, True), (True, False), (True, True)])
def test_cpu_fake_quantize_is_torchs_fake_quantize_bit_for_bit(symmetric: bool, signed_data: bool) -> None:
    g = torch.Generator().manual_seed(3)
    fq = TidlFakeQuantize(observer=ActivationObserver, symmetric=symmetric)
    x = torch.randn(8, 16, 12, 12, generator=g) * 3
    if not signed_data:
        x = x.abs()
    fq(x)  # observe: sets scale and zero point
    fq.disable_observer()
    scale = fq.scale.item()
    x.view(-1)[:500] = (torch.arange(500) - 250).float() * scale / 2  # exact ties: round half to even
    x.view(-1)[500:520] = 1e6  # clipped
    ref_in = x.clone().requires_grad_()
    ours_in = x.clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(ref_in, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max)
    ours = fq(ours_in)
    assert torch.equal(ours, ref)
    weights = torch.randn(x.shape, generator=g)
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    assert torch.equal(ours_in.grad, ref_in.grad)  # straight-through inside the range, zero where clipped
    with torch.no_grad():
        assert torch.equal(fq(x), ref.detach())


def test_fake_quantize_sees_every_way_its_flags_are_written() -> None:
    # the flags are read from the tensors only when written since the last read (a host sync on CUDA otherwise)
    fq = TidlFakeQuantize(observer=ActivationObserver)
    obs = fq.activation_post_process
    x = torch.randn(64)
    fq(x)
    assert int(obs.num_batches) == 1
    fq.disable_observer()
    fq(x)
    assert int(obs.num_batches) == 1
    fq.observer_enabled.copy_(torch.ones(1, dtype=torch.uint8))  # as bias calibration restores it
    fq(x)
    assert int(obs.num_batches) == 2
    state = fq.state_dict()
    state["observer_enabled"] = torch.zeros(1, dtype=torch.uint8)
    state["fake_quant_enabled"] = torch.zeros(1, dtype=torch.uint8)
    fq.load_state_dict(state)
    assert torch.equal(fq(x), x) and int(obs.num_batches) == 2  # neither observes nor quantizes


def test_unobserved_check_survives_reset_and_state_dict_load(caplog: pytest.LogCaptureFixture) -> None:
    obs = ActivationObserver()
    obs(torch.randn(32))
    obs.reset_min_max_vals()
    assert obs.calculate_qparams()[0].item() == 1.0 and "seen no data" in caplog.text
    caplog.clear()
    fresh = ActivationObserver()
    fresh(torch.randn(32))
    fresh.load_state_dict(ActivationObserver().state_dict())  # an unobserved checkpoint
    assert fresh.calculate_qparams()[0].item() == 1.0 and "seen no data" in caplog.text


def test_fake_quantize_reads_a_replaced_flag_buffer() -> None:
    fq = TidlFakeQuantize(observer=ActivationObserver)
    x = torch.randn(64)
    fq(x)  # flags read and cached
    state = fq.state_dict()
    state["observer_enabled"] = torch.zeros(1, dtype=torch.uint8)
    fq.load_state_dict(state, assign=True)  # a new tensor object, version 0 like the cached one
    fq(x)
    assert int(fq.activation_post_process.num_batches) == 1


def test_power_of_2_ceil_of_a_scale_one_ulp_above_a_power_of_two_is_the_next_power() -> None:
    powers = torch.tensor([2.0**k for k in range(-30, 10)])
    above = torch.nextafter(powers, torch.full_like(powers, 1e9))  # one float32 ulp above 2**k
    assert torch.equal(power_of_2_ceil(above), powers * 2)  # float32 log2 rounded these down to 2**k
    assert torch.equal(power_of_2_ceil(powers), powers)
    below = torch.nextafter(powers, torch.zeros_like(powers))
    assert torch.equal(power_of_2_ceil(below), powers)


# ------------------------------------------------------------------------- scalar CPU path == tensor path, bit for bit
@pytest.mark.parametrize("aggregation", ["max", "mean"])
@pytest.mark.parametrize(("symmetric", "power_of_2", "force_signed"),
                         [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
                          (True, False, True)])
@pytest.mark.parametrize("percentile", [0.0, 0.01, 1.0])
def test_scalar_observer_path_equals_the_tensor_path(aggregation: str, symmetric: bool, power_of_2: bool,
                                                      force_signed: bool, percentile: float) -> None:
    kwargs = dict(symmetric=symmetric, power_of_2=power_of_2, force_signed=force_signed,
                  range_shrink_percentile=percentile, range_aggregation=aggregation)
    scalar, tensor = ActivationObserver(**kwargs), ActivationObserver(**kwargs)
    g = torch.Generator().manual_seed(int(percentile * 100) + 7 * symmetric + 3 * power_of_2)
    for step in range(40):
        # ranges that drift, positive-only batches, one-sided batches, tiny tensors
        x = torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g) * (0.1 + step / 7)
        if step % 3 == 0:
            x = x.abs()
        if step % 5 == 0:
            x = x + 0.5 * step
        assert scalar._scalar_path(x)
        scalar(x)
        kernels.CPU_FAST_PATHS = False  # the tensor path, as on CUDA
        try:
            assert not tensor._scalar_path(x)
            tensor(x)
        finally:
            kernels.CPU_FAST_PATHS = True
        assert torch.equal(scalar.min_val, tensor.min_val) and torch.equal(scalar.max_val, tensor.max_val), step
        s_scale, s_zp = scalar.calculate_qparams()
        t_scale, t_zp = tensor._qparams_tensor()
        assert torch.equal(s_scale, t_scale) and torch.equal(s_zp, t_zp), (step, s_scale, t_scale, s_zp, t_zp)
        assert s_scale.dtype == torch.float32 and s_zp.dtype == torch.int32


def test_scalar_qparams_of_extreme_ranges_equal_the_tensor_path() -> None:
    for lo, hi in [(-3e38, 3e38), (0.0, 0.0), (-1e-30, 1e-30), (5.0, 7.0), (-7.0, -5.0), (float("nan"), 1.0)]:
        for symmetric in (False, True):
            obs = ActivationObserver(symmetric=symmetric, power_of_2=True)
            obs(torch.tensor([lo, hi]))
            s_scale, s_zp = obs.calculate_qparams()
            t_scale, t_zp = obs._qparams_tensor()
            assert torch.equal(s_scale, t_scale) or (s_scale.isnan().all() and t_scale.isnan().all()), (lo, hi)
            assert torch.equal(s_zp, t_zp) or s_scale.isnan().all(), (lo, hi)


def test_fake_quantize_scalar_path_writes_the_observers_qparams() -> None:
    fq = TidlFakeQuantize(observer=ActivationObserver, symmetric=True, range_shrink_percentile=0.01)
    x = torch.randn(16, 8, 10, 10, generator=torch.Generator().manual_seed(0))
    out = fq(x)
    scale, zp = fq.activation_post_process._qparams_tensor()
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127))


# ---------------------------------------------------------------------------- weight fake-quant output reuse
def _weight_fq() -> TidlFakeQuantize:
    return TidlFakeQuantize(observer=WeightObserver, per_channel=True, ch_axis=0, dtype=torch.qint8,
                            quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric)


def test_weight_fake_quant_reuses_its_output_only_while_nothing_changed() -> None:
    fq = _weight_fq()
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        first = fq(w)
        assert fq(w) is first  # same weight, same buffers: the cached output
        w.mul_(2.0)  # an in-place update (an optimizer step) moves the version counter
        second = fq(w)
        assert second is not first and torch.allclose(second, 2 * first)
        assert torch.equal(fq.scale, fq.activation_post_process.calculate_qparams()[0])
        fq.scale.mul_(2.0)
        fq.disable_observer()  # the scale now comes from the buffer, changed in place
        third = fq(w)
        assert third is not second
        assert torch.equal(third, torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point, 0, -128, 127))
        fq.disable_fake_quant()
        assert fq(w) is w
        other = w.detach().clone()
        fq.enable_fake_quant()
        assert fq(other) is not third  # another tensor with equal values is not the cached one
        out = fq(other)
        out.add_(1.0)  # the caller changed the output in place: not handed out again
        assert not torch.equal(fq(other), out)
    # autograd wanted: computed every time, with a graph, and the cache dropped
    a = fq(w)
    assert a.requires_grad and "_output_cache" not in fq.__dict__


def test_activation_fake_quant_keeps_no_output_cache() -> None:
    fq = TidlFakeQuantize(observer=ActivationObserver)
    x = torch.randn(64)
    with torch.no_grad():
        fq(x)
        fq(x)
    assert int(fq.activation_post_process.num_batches) == 2  # observed twice: activations are never reused
    assert "_output_cache" not in fq.__dict__


@pytest.mark.parametrize("ch_axis", [0, 1])
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_per_channel_fake_quantize_is_torchs_bit_for_bit(ch_axis: int, bits: int) -> None:
    g = torch.Generator().manual_seed(11 + ch_axis + bits)
    fq = TidlFakeQuantize(observer=WeightObserver, per_channel=True, ch_axis=ch_axis, bits=bits, dtype=torch.qint8,
                          quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
                          qscheme=torch.per_channel_symmetric)
    w = torch.randn(6, 5, 3, 3, generator=g)
    fq(w)  # observe: per-channel scales
    fq.disable_observer()
    scale = fq.scale.clone()
    shape = [1] * 4
    shape[ch_axis] = -1
    w.view(-1)[:90] = (torch.arange(90) - 45).float() * scale.reshape(shape).expand_as(w).reshape(-1)[:90] / 2
    w.view(-1)[90:100] = 1e4  # clipped
    ref_in, ours_in = w.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(ref_in, fq.scale, fq.zero_point, ch_axis, fq.quant_min, fq.quant_max)
    ours = fq(ours_in)
    assert torch.equal(ours, ref)
    weights = torch.randn(w.shape, generator=g)
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    assert torch.equal(ours_in.grad, ref_in.grad)
    with torch.no_grad():
        assert torch.equal(fq(w), ref.detach())
    fq.zero_point.fill_(1)  # not symmetric: torch's kernel, which knows zero points
    with torch.no_grad():
        assert torch.equal(fq(w), torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point, ch_axis,
                                                                         fq.quant_min, fq.quant_max))


def test_weight_fake_quant_reuse_sees_a_replaced_data() -> None:
    # assigning .data (what Module.to/.double do to parameters) keeps the object and its version counter
    fq = _weight_fq()
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        first = fq(w)
        version = w._version
        w.data = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2))
        assert w._version == version  # the hazard: same object, same version, other values
        second = fq(w)
        assert torch.equal(second, torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point, 0, -128, 127))
        assert not torch.equal(second, first)


def test_fake_quantize_reads_a_flag_whose_data_was_replaced() -> None:
    fq = TidlFakeQuantize(observer=ActivationObserver)
    x = torch.randn(64)
    fq(x)  # flags read and cached
    version = fq.observer_enabled._version
    fq.observer_enabled.data = torch.zeros(1, dtype=torch.uint8)  # same object, same version counter
    assert fq.observer_enabled._version == version
    fq(x)
    assert int(fq.activation_post_process.num_batches) == 1


def test_weight_fake_quant_reuse_sees_its_observers_buffers() -> None:
    fq = _weight_fq()
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = fq(w)
        fq.activation_post_process.eps.fill_(1.0)  # every scale now at least 1: the output changes
        second = fq(w)
        assert second is not first and torch.equal(fq.scale, torch.ones(6))
        state = fq.activation_post_process.state_dict()
        state["max_val"] = state["max_val"] * 3
        fq.activation_post_process.load_state_dict(state)
        fq(w)  # observed again: the observer holds this weight's range, not the loaded one
        assert torch.equal(fq.activation_post_process.max_val, w.reshape(6, -1).amax(dim=1))
