"""The timm / model-zoo families end to end on in-repo models reproducing their patterns (fixtures/zoo_models.py):
BatchNorm subclasses with their activation, Identity gaps, SE, hardswish, LayerNorm2d, SDPA and MHA attention,
FPN and ASPP heads; wrap -> calibrate -> export (both exporters) -> fix -> parity -> validate."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization.fake_quantize import FakeQuantizeBase  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fixtures.zoo_models import BatchNormAct2d, ViTLike, make_family  # noqa: E402
from tiexport import compat  # noqa: E402
from tiexport.wrappers import PTCFxModule, QATFxModule  # noqa: E402

COMBOS = [("WC8_AT8", "AM68A"), ("WT8SYMP2_AT8SYMP2", "TDA4VM")]
needs_dynamo = pytest.mark.skipif(not compat.has_dynamo_exporter(), reason="needs the dynamo exporter (onnxscript)")


def _data(shape: tuple[int, ...], n: int = 3, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand((batch, *shape[1:]), generator=g) for _ in range(n)]


def _calibrated(name: str, qconfig_type: str = "WC8_AT8") -> tuple[PTCFxModule, torch.Tensor]:
    model, shape = make_family(name)
    data = _data(shape)
    w = PTCFxModule(model, qconfig_type=qconfig_type, example_inputs=data[0])
    for _ in range(2):
        w.train()
        for x in data:
            w(x)
    w.eval()
    return w, torch.rand(shape, generator=torch.Generator().manual_seed(2))


def _op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _functional_batch_norms(w: PTCFxModule) -> list[str]:
    return [n.name for n in w.module.graph.nodes
            if n.op == "call_function" and n.target in (torch.nn.functional.batch_norm, torch.batch_norm)]


# --- batch norm: subclasses with an activation, Identity gaps ------------------------------------------------------

def test_batch_norm_act_subclass_folds_into_the_conv() -> None:
    w, _ = _calibrated("efficientnet")
    assert not _functional_batch_norms(w)
    assert w.unquantized == {}
    fused = [m for m in w.module.modules() if type(m).__name__ in ("ConvBn2d", "ConvBnReLU2d")]
    assert len(fused) == 11  # stem, 3 x 3 block convs, head conv: every BatchNormAct2d folded
    modules = dict(w.module.named_modules(remove_duplicate=False))
    assert not [n for n in w.module.graph.nodes
                if n.op == "call_module" and isinstance(modules[str(n.target)], nn.BatchNorm2d)]


def test_batch_norm_act_swap_shares_parameters_and_keeps_the_function() -> None:
    from tiexport.quantization.conv_bn import swap_batch_norm_subclasses

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.SiLU))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    gamma = model[1].weight
    swapped, kept = swap_batch_norm_subclasses(model)
    assert swapped == ["1"] and kept == {}
    assert type(model[1]) is nn.Sequential and type(model[1][0]) is nn.BatchNorm2d
    assert model[1][0].weight is gamma and isinstance(model[1][1], nn.SiLU)
    torch.testing.assert_close(model(x), before)


class _ScaledBatchNorm(nn.BatchNorm2d):
    """A subclass whose forward is not batch norm + children: the wrapper cannot swap it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                  self.momentum, self.eps)


def test_unswappable_batch_norm_subclass_is_named_at_wrap_time(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledBatchNorm(4), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="tiexport.wrappers.fx"):
        w = PTCFxModule(model, example_inputs=torch.rand(2, 3, 8, 8))
    text = caplog.text
    assert "1: _ScaledBatchNorm: its forward is not a batch norm" in text
    assert any("batch norm computed in its forward" in r for r in w.unquantized.values())


def test_identity_between_conv_bn_and_relu_does_not_stop_folding() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Identity(), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU())
    w = PTCFxModule(model, example_inputs=torch.rand(2, 3, 8, 8))
    assert any(type(m).__name__ == "ConvBnReLU2d" for m in w.module.modules())


class _FloatLeaf(nn.Module):
    """A leaf torch.fx does not trace into (a custom op users mark as a leaf): left float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu(x)


def test_opaque_sdpa_is_named_at_wrap_time(caplog: pytest.LogCaptureFixture) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch._C._nn.scaled_dot_product_attention(q, k, v)  # bound directly: not patchable

    with caplog.at_level(logging.WARNING, logger="tiexport.wrappers.fx"):
        w = PTCFxModule(Net(), example_inputs=torch.rand(1, 4, 8))
    assert any("scaled_dot_product_attention stays float" in r for r in w.unquantized.values())
    assert "scaled_dot_product_attention stays float" in caplog.text


# --- attention ---------------------------------------------------------------------------------------------------

def test_sdpa_is_traced_as_matmul_softmax_matmul_with_fake_quants() -> None:
    w, _ = _calibrated("vit_sdpa")
    graph = w.module.graph
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert torch._C._nn.scaled_dot_product_attention not in targets
    assert targets.count(torch.matmul) == 4 and targets.count(torch.softmax) == 2
    modules = dict(w.module.named_modules(remove_duplicate=False))
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (torch.matmul, torch.softmax):
            assert any(u.op == "call_module" and isinstance(modules[str(u.target)], FakeQuantizeBase)
                       for u in node.users), node.name
    assert w.unquantized == {}


def test_sdpa_decomposition_matches_torch() -> None:
    from tiexport.quantization.attention import sdpa_decomposed

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.randn(5, 5, generator=g)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask > 0}, {"scale": 0.3}):
        torch.testing.assert_close(sdpa_decomposed(q, k, v, **kwargs),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs))


def test_wrapper_export_of_sdpa_model_has_quantized_attention(tmp_path: Path) -> None:
    w, x = _calibrated("vit_sdpa")
    result = w.export(x, tmp_path / "vit.onnx", device="AM68A")
    model = onnx.load(str(result.path))
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Softmax"):
            assert all(producer[i].op_type == "DequantizeLinear" for i in node.input if i in producer), node.name
    assert result.validation.devices["AM68A"].verdict != "incompatible"


# --- static shapes at export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=needs_dynamo)])
def test_traced_shape_arithmetic_exports_as_constants(tmp_path: Path, exporter: str) -> None:
    import tiexport

    w, x = _calibrated("vit_sdpa")
    path = tmp_path / "vit.onnx"
    tiexport.export(w.module, x, path, exporter=exporter)
    ops = _op_types(path)
    for op in ("Shape", "ConstantOfShape", "Expand", "Where"):
        assert op not in ops, (op, exporter)


def test_interpolate_to_a_size_exports_constant_scales(tmp_path: Path) -> None:
    import tiexport

    w, x = _calibrated("aspp")
    path = tmp_path / "aspp.onnx"
    tiexport.export(w.module, x, path)
    model = onnx.load(str(path))
    assert "Shape" not in [n.op_type for n in model.graph.node]
    assert w.module.graph is not None and any(
        n.target is torch.nn.functional.interpolate and n.kwargs.get("size") is not None for n in w.module.graph.nodes
    ), "the wrapped model itself is unchanged"


# --- every family, end to end --------------------------------------------------------------------------------------

FAMILY_NAMES = ["resnet", "mobilenetv2", "mobilenetv3", "efficientnet", "efficientnet_lite", "regnet", "convnext",
                "vit_sdpa", "vit_mha", "fpn", "aspp"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize(("qconfig_type", "device"), COMBOS)
def test_family_ptc_torchscript_end_to_end(tmp_path: Path, name: str, qconfig_type: str, device: str) -> None:
    w, x = _calibrated(name, qconfig_type)
    result = w.export(x, tmp_path / f"{name}.onnx", device=device)
    assert result.parity_passed, result.parity_summary
    assert result.validation.devices[device].verdict != "incompatible", result.validation.to_text()


@needs_dynamo
# CI time: the families whose dynamo export differs (BN+act, as_strided, Split, Resize)
@pytest.mark.parametrize("name", ["efficientnet", "convnext", "vit_sdpa", "vit_mha", "aspp"])
def test_family_ptc_dynamo_end_to_end(tmp_path: Path, name: str) -> None:
    w, x = _calibrated(name, "WC8_AT8")
    result = w.export(x, tmp_path / f"{name}.onnx", device="AM68A", exporter="dynamo")
    assert result.parity_passed, result.parity_summary
    assert result.validation.devices["AM68A"].verdict != "incompatible", result.validation.to_text()


@pytest.mark.parametrize("name", ["efficientnet", "vit_sdpa"])
def test_family_qat_end_to_end(tmp_path: Path, name: str) -> None:
    model, shape = make_family(name)
    data = _data(shape, n=2)
    w = QATFxModule(model, total_epochs=2, example_inputs=data[0])
    opt = torch.optim.SGD(w.parameters(), lr=1e-3)
    for _ in range(2):
        w.train()
        for x in data:
            loss = w(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w.eval()
    assert not _functional_batch_norms(w)
    result = w.export(data[0][:1], tmp_path / f"{name}.onnx", device="AM68A")
    assert result.parity_passed, result.parity_summary
    assert result.validation.devices["AM68A"].verdict != "incompatible"


def test_vit_like_forward_matches_with_mha() -> None:
    model = ViTLike(mha=True).eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


class _OptionalArgsNet(nn.Module):
    """timm's VisionTransformer signature: optional arguments passed down to the attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(1, 4, 3, 8).permute(2, 0, 1, 3).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def test_optional_forward_arguments_are_traced_as_their_defaults(tmp_path: Path) -> None:
    x = torch.rand(1, 4, 8)
    w = PTCFxModule(_OptionalArgsNet(), example_inputs=x)
    w.train()
    w(x)
    w.eval()
    result = w.export(x, tmp_path / "opt.onnx", device="AM68A")  # was: 'is_causal' must be bool, not Tensor
    assert result.parity_passed, result.parity_summary
    assert [i.name for i in onnx.load(str(result.path)).graph.input] == ["x"]


@needs_dynamo
def test_vit_exports_the_same_tidl_layers_with_both_exporters(tmp_path: Path) -> None:
    """timm's q/k/v unbind from a 5-D tensor (TIDL058) and its class token ``x[:, 0]`` (a scalar Gather, TIDL068)
    run on Arm as exported; the export pipeline rewrites both, and the verdict and findings do not depend on the
    exporter."""
    w, x = _calibrated("vit_sdpa")
    found = {}
    for exporter in ("torchscript", "dynamo"):
        result = w.export(x, tmp_path / f"vit_{exporter}.onnx", device="AM68A", exporter=exporter)
        assert result.parity_passed, result.parity_summary
        dev = result.validation.devices["AM68A"]
        found[exporter] = (dev.verdict, sorted({f.rule_id for f in dev.findings if f.severity != "info"}))
        assert {"TIDL058", "TIDL068", "TIDL014"}.isdisjoint(found[exporter][1]), found[exporter]
    assert found["torchscript"] == found["dynamo"]
