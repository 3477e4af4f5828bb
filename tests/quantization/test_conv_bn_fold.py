"""conv_bn.install_conv_bn_forward: a frozen QAT Conv+BN computes the folded form (what the export computes), an
updating one torch's batch-statistics function with the 1/f on the weight, and gradients reach the same parameters."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tiexport.quantization import conv_bn  # noqa: E402


def _conv_bn(relu: bool) -> nn.Module:
    import torch.ao.nn.intrinsic.qat as nniqat
    from torch.ao.quantization import get_default_qat_qconfig

    torch.manual_seed(0)
    cls = nniqat.ConvBnReLU2d if relu else nniqat.ConvBn2d
    m = cls(4, 6, 3, padding=1, bias=True, qconfig=get_default_qat_qconfig("qnnpack"))
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m


@pytest.mark.parametrize("relu", [False, True])
def test_frozen_module_computes_the_folded_form(relu: bool) -> None:
    ref = _conv_bn(relu)
    folded = copy.deepcopy(ref)
    assert conv_bn.install_conv_bn_forward(folded) == 1
    for m in (ref, folded):
        m.train()
        m.freeze_bn_stats()
    factor = ref.bn.weight / torch.sqrt(ref.bn.running_var + ref.bn.eps)
    with torch.no_grad():
        ref.weight_fake_quant(ref.weight * factor.reshape(-1, 1, 1, 1))  # observe the folded weight once
    folded.weight_fake_quant.load_state_dict(ref.weight_fake_quant.state_dict())
    for m in (ref, folded):
        m.weight_fake_quant.disable_observer()  # the same weight grid for both
    assert float(ref.weight_fake_quant.scale.max()) < 0.1  # a real 8-bit grid, not the unobserved scale 1
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = ref(x), folded(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    b.sum().backward()
    assert folded.weight.grad is not None and folded.bn.weight.grad is not None and folded.bn.bias.grad is not None
    assert folded.bias.grad is not None


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_updating_batch_norm_is_torchs_function(relu: bool, bias: bool) -> None:
    import torch.ao.nn.intrinsic.qat as nniqat
    from torch.ao.quantization import get_default_qat_qconfig

    torch.manual_seed(0)
    cls = nniqat.ConvBnReLU2d if relu else nniqat.ConvBn2d
    ref = cls(4, 6, 3, padding=1, bias=bias, qconfig=get_default_qat_qconfig("qnnpack"))
    with torch.no_grad():
        ref.bn.running_var.uniform_(0.5, 2.0)
        ref.bn.weight.uniform_(-1.5, 1.5)  # negative gammas too: f = g/std changes sign
        if bias:
            ref.bias.uniform_(-0.5, 0.5)
    ours = copy.deepcopy(ref)
    assert conv_bn.install_conv_bn_forward(ours) == 1
    ref.train()
    ours.train()  # batch norm updating: batch statistics, running stats change
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    a, b = ref(x), ours(x)
    assert ours.weight_fake_quant.scale.max() < 0.1  # a real 8-bit weight grid took part
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ref.bn.running_mean, ours.bn.running_mean, atol=1e-6, rtol=1e-5)
    assert torch.allclose(ref.bn.running_var, ours.bn.running_var, atol=1e-6, rtol=1e-5)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    (a * g).sum().backward()
    (b * g).sum().backward()
    for name, p in ref.named_parameters():
        q = dict(ours.named_parameters())[name]
        assert q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name
    # the division is on the weight: no activation-sized division, forward or backward
    from torch.profiler import ProfilerActivity, profile

    ours.zero_grad()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        ours(x).sum().backward()
    div_shapes = {tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::div" and e.input_shapes}
    assert div_shapes and all(shape != tuple(a.shape) for shape in div_shapes), div_shapes


def test_frozen_folded_weight_is_reused_only_while_its_sources_are_unchanged() -> None:
    m = _conv_bn(False)
    conv_bn.install_conv_bn_forward(m)
    m.train()
    m.freeze_bn_stats()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        m(x)  # observe the weight once; torch's moving-average observer would move on every call
    m.weight_fake_quant.disable_observer()

    def fresh() -> torch.Tensor:  # the folded form computed from scratch
        factor, bias = conv_bn.conv_bn_folding(m)
        w = m.weight_fake_quant(m.weight * factor.reshape(-1, 1, 1, 1))
        return torch.nn.functional.conv2d(x, w, bias, padding=1)

    with torch.no_grad():
        first = conv_bn._folded_weight(m, conv_bn.conv_bn_folding(m)[0])
        assert conv_bn._folded_weight(m, conv_bn.conv_bn_folding(m)[0]) is first
        for change in (lambda: m.bn.running_var.mul_(1.5), lambda: m.weight.add_(0.1),
                       lambda: m.bn.weight.mul_(0.5)):
            change()
            assert torch.equal(m(x), fresh())
            assert conv_bn._folded_weight(m, conv_bn.conv_bn_folding(m)[0]) is not first
            first = conv_bn._folded_weight(m, conv_bn.conv_bn_folding(m)[0])
    out = m(x)  # with autograd: computed afresh, gradients reach the weight
    out.sum().backward()
    assert m.weight.grad is not None and "_folded_weight_cache" not in m.__dict__


def test_folded_weight_reuse_sees_a_replaced_data() -> None:
    m = _conv_bn(False)
    conv_bn.install_conv_bn_forward(m)
    m.train()
    m.freeze_bn_stats()
    with torch.no_grad():
        first = conv_bn._folded_weight(m, conv_bn.conv_bn_folding(m)[0])
        m.weight.data = m.weight.data * 2.0  # a new storage, the same Parameter and version counter
        second = conv_bn._folded_weight(m, conv_bn.conv_bn_folding(m)[0])
        assert second is not first and torch.allclose(second, 2 * first)
