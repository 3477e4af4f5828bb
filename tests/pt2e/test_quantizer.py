"""TIDLQuantizer: the FX path's qconfig types and graph rules as torchao PT2E annotations."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from fixtures.torch_models import SmallCNN, TransformerBlock, calibration_batches  # noqa: E402
from tiexport import compat  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402
from tiexport.quantization.observers import ActivationObserver, WeightObserver  # noqa: E402
from tiexport.quantization.pt2e import (  # noqa: E402
    TidlPT2EFakeQuantize,
    TidlPT2EFixedQParamsFakeQuantize,
    TIDLQuantizer,
    name_fake_quants,
    qconfig_type_for_device,
)
from tiexport.quantization.qconfig import QCONFIG_TYPES  # noqa: E402

ao = compat.torchao_pt2e()
ATEN = torch.ops.aten


def _prepared(model: torch.nn.Module, shape: tuple[int, ...], quantizer: TIDLQuantizer, qat: bool = False):
    model.train(qat)
    torch.manual_seed(0)
    gm = compat.export_for_quantization(model, (torch.randn(*shape),), {})
    prepared = (ao.prepare_qat_pt2e if qat else ao.prepare_pt2e)(gm, quantizer)
    name_fake_quants(prepared)
    return prepared


def _fq_of(prepared, node):  # the fake-quant module a call_module node runs
    return prepared.get_submodule(str(node.target))


def _fq_nodes(prepared):
    return [n for n in prepared.graph.nodes if n.op == "call_module"
            and isinstance(prepared.get_submodule(str(n.target)), TidlPT2EFakeQuantize | TidlPT2EFixedQParamsFakeQuantize)]


def _input_fq(prepared, node, i):
    arg = node.args[i]
    assert arg.op == "call_module", f"{node.name} input {i} is not fake-quantized"
    return _fq_of(prepared, arg)


def _single(prepared, target):
    nodes = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target == target]
    assert nodes, target
    return nodes


def test_fake_quants_are_tiexport_ones_and_torchao_ones() -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer("WC8_AT8"))
    fqs = {id(_fq_of(prepared, n)): _fq_of(prepared, n) for n in _fq_nodes(prepared)}
    assert fqs
    for fq in fqs.values():
        assert isinstance(fq, ao.FakeQuantizeBase)
        assert isinstance(fq.activation_post_process, ActivationObserver | WeightObserver)


@pytest.mark.parametrize("qtype", sorted(QCONFIG_TYPES))
def test_weight_and_activation_schemes_follow_the_type(qtype: str) -> None:
    spec = QCONFIG_TYPES[qtype]
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer(qtype))
    for b in calibration_batches((4, 3, 32, 32), n=2):
        prepared(b)
    convs = _single(prepared, ATEN.conv2d.default)
    for conv in convs:
        w = _input_fq(prepared, conv, 1).activation_post_process
        assert isinstance(w, WeightObserver)
        assert w.per_channel == spec.weight_per_channel and w.power_of_2 == spec.weight_power_of_2
        scale = _input_fq(prepared, conv, 1).scale
        if spec.weight_power_of_2:
            assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    # the first conv's output (after the fused ReLU) has its own activation fake-quant of the type's scheme
    relu = next(iter(convs[0].users))
    act = _fq_of(prepared, next(iter(relu.users))).activation_post_process
    assert isinstance(act, ActivationObserver)
    assert act.symmetric == spec.activation_symmetric and act.power_of_2 == spec.activation_power_of_2
    assert (act.range_shrink_percentile > 0) == spec.range_shrink


def test_fused_conv_relu_has_no_q_dq_between_and_pooling_shares_its_input() -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer("WC8_AT8"))
    conv = _single(prepared, ATEN.conv2d.default)[0]
    assert next(iter(conv.users)).target == ATEN.relu.default  # conv -> relu, no fake-quant between
    pool = _single(prepared, ATEN.max_pool2d.default)[0]
    out = _fq_of(prepared, next(iter(pool.users)))
    assert out is _input_fq(prepared, pool, 0)  # max pooling: no Q/DQ of its own


def test_concat_inputs_share_one_fake_quant() -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer("WC8_AT8"))
    cat = _single(prepared, ATEN.cat.default)[0]
    fqs = {id(_fq_of(prepared, a)) for a in cat.args[0]} | {id(_fq_of(prepared, next(iter(cat.users))))}
    assert len(fqs) == 1


@pytest.mark.parametrize(("qtype", "shared"), [("WT8SYMP2_AT8SYMP2", True), ("WC8_AT8", False)])
def test_add_inputs_share_one_fake_quant_for_the_tda4vm_type_only(qtype: str, shared: bool) -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer(qtype))
    add = _single(prepared, ATEN.add.Tensor)[0]
    assert (_input_fq(prepared, add, 0) is _input_fq(prepared, add, 1)) == shared


def test_network_input_is_symmetric_without_range_shrink() -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer("WC8_AT8"))
    x = next(n for n in prepared.graph.nodes if n.op == "placeholder")
    fq = next(u for u in x.users if u.op == "call_module" and str(u.target) != "_guards_fn")
    obs = _fq_of(prepared, fq).activation_post_process
    assert obs.symmetric and obs.range_shrink_percentile == 0.0


def test_matmul_rules_and_fixed_range_softmax() -> None:
    quantizer = TIDLQuantizer("WC8_AT8")
    prepared = _prepared(TransformerBlock(), (1, 8, 32), quantizer)
    first, second = _single(prepared, ATEN.matmul.default)
    # q @ k^T: both inputs signed linear outputs -> symmetric; its output int8 even if non-negative
    for i in (0, 1):
        assert _input_fq(prepared, first, i).activation_post_process.symmetric
    out = _fq_of(prepared, next(iter(first.users))).activation_post_process
    assert out.symmetric and out.force_signed
    # softmax(...) @ v: the softmax side keeps its fixed unsigned range, v is made symmetric
    softmax = _single(prepared, ATEN.softmax.int)[0]
    assert isinstance(_fq_of(prepared, next(iter(softmax.users))), TidlPT2EFixedQParamsFakeQuantize)
    assert _input_fq(prepared, second, 1).activation_post_process.symmetric
    assert quantizer.rules["matmul_inputs"]


@pytest.mark.parametrize(("qtype", "dtype"), [("WC8_AT8", torch.quint8), ("WT8SYMP2_AT8SYMP2", torch.qint8)])
def test_softmax_beside_signed_values_is_int8_for_the_tda4vm_type(qtype: str, dtype: torch.dtype) -> None:
    """TDA4VM takes no signed x unsigned MatMul (edgeai-tidl-tools rel_11_00 supported_ops_rts_versions.md L18)."""
    prepared = _prepared(TransformerBlock(), (1, 8, 32), TIDLQuantizer(qtype))
    softmax = _single(prepared, ATEN.softmax.int)[0]
    fq = _fq_of(prepared, next(iter(softmax.users)))
    assert isinstance(fq, TidlPT2EFixedQParamsFakeQuantize) and fq.dtype == dtype and int(fq.zero_point) == 0


def test_layer_norm_weights_stay_float() -> None:
    prepared = _prepared(TransformerBlock(), (1, 8, 32), TIDLQuantizer("WC8_AT8"))
    ln = _single(prepared, ATEN.layer_norm.default)[0]
    assert ln.args[2].op == "get_attr"  # the affine weight is read as a float tensor, no fake-quant


def test_qat_conv_bn_is_quantized_after_the_batch_norm_and_relu() -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer("WC8_AT8"), qat=True)
    bn = _single(prepared, ATEN.batch_norm.default)[0]
    relu = next(iter(bn.users))
    assert relu.target == ATEN.relu.default
    assert next(iter(relu.users)).op == "call_module"


def test_names_say_what_is_quantized() -> None:
    prepared = _prepared(SmallCNN(), (1, 3, 32, 32), TIDLQuantizer("WC8_AT8"))
    names = {str(n.target) for n in _fq_nodes(prepared)}
    assert {"stem.0.weight_fake_quant", "fc.weight_fake_quant", "x_activation_post_process",
            "stem.2.activation_post_process", "fc.activation_post_process"} <= names


@pytest.mark.parametrize(("device", "qtype"), [("TDA4VM", "WT8SYMP2_AT8SYMP2"), ("AM68A", "WC8_AT8"),
                                               ("AM62A", "WC8_AT8")])
def test_device_picks_the_type(device: str, qtype: str) -> None:
    assert qconfig_type_for_device(device) == qtype
    assert TIDLQuantizer(device=device).qconfig_type == qtype
    assert TIDLQuantizer("MSA_WC8_AT8", device=device).qconfig_type == "MSA_WC8_AT8"  # a given type wins


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        TIDLQuantizer("WC16_AT16")
    with pytest.raises(UsageError):
        TIDLQuantizer("MSA_WC8_AT8", range_shrink_percentile=0.1)
