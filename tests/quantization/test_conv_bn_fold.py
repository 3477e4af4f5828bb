"""compat.fold_frozen_conv_bn: a frozen QAT Conv+BN computes the folded form (what the export computes), an
updating one keeps torch's batch-statistics path, and gradients still reach the conv and batch-norm parameters."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tiexport import compat  # noqa: E402


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
    assert compat.fold_frozen_conv_bn(folded) == 1
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


def test_updating_batch_norm_keeps_torchs_path() -> None:
    ref = _conv_bn(False)
    folded = copy.deepcopy(ref)
    compat.fold_frozen_conv_bn(folded)
    ref.train()
    folded.train()  # batch norm updating: batch statistics, running stats change
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ref(x), folded(x))
    assert torch.equal(ref.bn.running_mean, folded.bn.running_mean)
