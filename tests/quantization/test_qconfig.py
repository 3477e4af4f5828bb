"""qconfig types on real prepared models: power-of-2, symmetric zero points, weight granularity, MatMul rule."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.ao.quantization import QConfig, QConfigMapping, default_qat_qconfig  # noqa: E402

from tests.quantization._models import TinyCNN, batches, seeded  # noqa: E402
from tiexport.errors import UsageError  # noqa: E402
from tiexport.quantization.observers import ActivationObserver, WeightObserver  # noqa: E402
from tiexport.quantization.qconfig import (  # noqa: E402
    QCONFIG_TYPES,
    get_qconfig,
    get_qconfig_mapping,
    qconfig_type_name,
)
from tiexport.wrappers import PTCFxModule  # noqa: E402

P2_TYPES = [name for name, t in QCONFIG_TYPES.items() if t.activation_power_of_2]


def _calibrated(qconfig_type: str, model: nn.Module | None = None, shape: tuple[int, ...] = (4, 1, 6, 6)) -> PTCFxModule:
    model = model if model is not None else seeded(TinyCNN())
    data = batches(shape, 3)
    w = PTCFxModule(model, qconfig_type=qconfig_type, example_inputs=data[0], bias_calibration_factor=0.0)
    w.train()
    for x in data:
        w(x)
    return w.eval()


def _fake_quants(w: PTCFxModule) -> list[tuple[str, nn.Module]]:
    from torch.ao.quantization import FakeQuantize

    return [(n, m) for n, m in w.module.named_modules() if isinstance(m, FakeQuantize)]


def _is_power_of_2(t: torch.Tensor) -> bool:
    return bool((torch.frexp(t.float())[0] == 0.5).all())


def test_all_six_types_exist() -> None:
    assert set(QCONFIG_TYPES) == {
        "WC8_AT8", "MSA_WC8_AT8", "WT8SYMP2_AT8SYMP2", "WC8SYMP2_AT8SYMP2", "WC8P2_AT8P2", "MSA_WC8P2_AT8P2",
    }


def test_default_is_wc8_at8_not_msa() -> None:
    assert qconfig_type_name("DEFAULT") == "WC8_AT8"
    assert qconfig_type_name("wc8_at8") == "WC8_AT8"


def test_unknown_type_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown qconfig_type 'WC9'"):
        get_qconfig_mapping("WC9")


def test_msa_type_refuses_a_range_shrink_percentile() -> None:
    with pytest.raises(UsageError, match="full activation range"):
        get_qconfig("MSA_WC8_AT8", range_shrink_percentile=0.1)


def test_range_shrink_default_for_non_msa_and_zero_for_msa() -> None:
    shrink = get_qconfig("WC8_AT8").activation().activation_post_process
    full = get_qconfig("MSA_WC8P2_AT8P2").activation().activation_post_process
    assert shrink.range_shrink_percentile > 0
    assert (full.range_shrink_percentile, full.range_aggregation) == (0.0, "max")


@pytest.mark.parametrize(("qconfig_type", "aggregation"), [
    ("WC8_AT8", "max"), ("MSA_WC8_AT8", "max"), ("MSA_WC8P2_AT8P2", "max"),  # widest range / full range
    ("WT8SYMP2_AT8SYMP2", "mean"), ("WC8SYMP2_AT8SYMP2", "mean"), ("WC8P2_AT8P2", "mean"),  # power-of-2: averaged
])
def test_range_aggregation_of_each_type(qconfig_type: str, aggregation: str) -> None:
    assert get_qconfig(qconfig_type).activation().activation_post_process.range_aggregation == aggregation


def test_msa_and_range_shrink_types_differ_on_data_with_outliers() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40000, generator=gen)
    x[:4] = 40.0
    scales = {}
    for name in ("WC8_AT8", "MSA_WC8_AT8"):
        fq = get_qconfig(name).activation()
        fq(x)
        scales[name] = fq.scale.item()
    assert scales["MSA_WC8_AT8"] == pytest.approx((40.0 - x.min().item()) / 255, rel=1e-5)
    assert scales["WC8_AT8"] < scales["MSA_WC8_AT8"] / 4


@pytest.mark.parametrize("qconfig_type", P2_TYPES)
def test_power_of_2_types_give_exact_power_of_2_scales(qconfig_type: str) -> None:
    w = _calibrated(qconfig_type)
    fqs = _fake_quants(w)
    assert fqs
    for name, fq in fqs:
        assert _is_power_of_2(fq.scale), f"{name}: {fq.scale}"


@pytest.mark.parametrize("qconfig_type", ["WT8SYMP2_AT8SYMP2", "WC8SYMP2_AT8SYMP2"])
def test_symmetric_types_have_zero_point_0_and_int8_for_signed_tensors(qconfig_type: str) -> None:
    w = _calibrated(qconfig_type)
    kinds = set()
    for name, fq in _fake_quants(w):
        assert (fq.zero_point == 0).all(), name
        obs = fq.activation_post_process
        if isinstance(obs, ActivationObserver):
            signed = obs.min_val.item() < 0
            assert fq.dtype == (torch.qint8 if signed else torch.quint8)
            kinds.add(fq.dtype)
    assert kinds == {torch.qint8, torch.quint8}  # the input is signed, post-ReLU tensors are not


@pytest.mark.parametrize("qconfig_type", list(QCONFIG_TYPES))
def test_weights_int8_symmetric_with_granularity_of_the_type(qconfig_type: str) -> None:
    w = _calibrated(qconfig_type)
    per_channel = QCONFIG_TYPES[qconfig_type].weight_per_channel
    weights = [(n, fq) for n, fq in _fake_quants(w) if isinstance(fq.activation_post_process, WeightObserver)]
    assert len(weights) == 3
    for name, fq in weights:
        assert fq.dtype == torch.qint8 and (fq.quant_min, fq.quant_max) == (-128, 127), name
        assert (fq.zero_point == 0).all()
        if per_channel:
            assert fq.qscheme == torch.per_channel_symmetric and fq.ch_axis == 0 and fq.scale.numel() > 1
        else:
            assert fq.qscheme == torch.per_tensor_symmetric and fq.scale.numel() == 1


def test_affine_type_uses_uint8_with_non_zero_zero_point_for_signed_tensors() -> None:
    w = _calibrated("WC8_AT8")
    output_fq = w.module.get_submodule(list(w.module.graph.nodes)[-2].target)
    assert output_fq.dtype == torch.quint8 and 0 < output_fq.zero_point.item() < 255


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-2, -1)), dim=-1)
        return torch.matmul(scores, torch.relu(self.v(x)))


def _observer_of(w: PTCFxModule, producer: str) -> ActivationObserver:
    for node in w.module.graph.nodes:
        if node.op == "call_module" and node.target == producer:
            (user,) = node.users
            return w.module.get_submodule(user.target).activation_post_process
    raise AssertionError(producer)


def test_matmul_inputs_symmetric_unless_fed_by_softmax_or_relu() -> None:
    w = _calibrated("WC8_AT8", model=_Attention().eval(), shape=(2, 3, 4))
    assert _observer_of(w, "q").symmetric and _observer_of(w, "k").symmetric
    assert _observer_of(w, "q").dtype == torch.qint8
    relu_fed = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    relu_obs = w.module.get_submodule(next(iter(relu_fed.users)).target).activation_post_process
    assert not relu_obs.symmetric
    softmax = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target is torch.softmax)
    softmax_fq = w.module.get_submodule(next(iter(softmax.users)).target)
    assert not softmax_fq.activation_post_process.symmetric  # non-negative: uint8 with zero point 0 anyway
    assert softmax_fq.zero_point.item() == 0 and softmax_fq.dtype == torch.quint8
    # v feeds a Relu, not the MatMul directly: its own output stays affine
    assert not _observer_of(w, "v").symmetric


def test_matmul_output_is_int8_when_its_inputs_are_signed() -> None:
    w = _calibrated("WC8_AT8", model=_Attention().eval(), shape=(2, 3, 4))
    first = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    fq = w.module.get_submodule(next(iter(first.users)).target)
    assert fq.activation_post_process.symmetric and fq.activation_post_process.force_signed
    assert fq.dtype == torch.qint8 and fq.zero_point.item() == 0


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) * self.b(x)) + self.a(x)


def test_mul_inputs_and_output_symmetric_add_stays_affine() -> None:
    w = _calibrated("WC8_AT8", model=_Gate().eval(), shape=(8, 4))
    mul = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target.__name__ == "mul")
    add = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target.__name__ == "add")
    for arg in mul.args:
        assert w.module.get_submodule(arg.target).activation_post_process.symmetric
    assert w.module.get_submodule(next(iter(mul.users)).target).activation_post_process.symmetric
    assert not w.module.get_submodule(next(iter(add.users)).target).activation_post_process.symmetric


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x) * 3], dim=1)


class _Residual(_Branches):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) * 3


def _input_scales(w: PTCFxModule, op: object) -> list[float]:
    node = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target is op)
    args = node.args[0] if isinstance(node.args[0], (list, tuple)) else node.args[:2]
    return [w.module.get_submodule(a.target).scale.item() for a in args]


@pytest.mark.parametrize("qconfig_type", ["WC8_AT8", "WT8SYMP2_AT8SYMP2"])
def test_concat_inputs_share_one_scale(qconfig_type: str) -> None:
    w = _calibrated(qconfig_type, model=_Branches().eval(), shape=(8, 4))
    scales = _input_scales(w, torch.cat)
    assert scales[0] == scales[1]


def test_add_inputs_share_one_scale_only_for_the_tda4vm_type() -> None:
    import operator

    aligned = _calibrated("WT8SYMP2_AT8SYMP2", model=_Residual().eval(), shape=(8, 4))
    assert len(set(_input_scales(aligned, operator.add))) == 1
    free = _calibrated("WC8_AT8", model=_Residual().eval(), shape=(8, 4))
    assert len(set(_input_scales(free, operator.add))) == 2


def test_network_input_is_symmetric_and_not_range_shrunk() -> None:
    w = _calibrated("WC8_AT8")
    placeholder = next(n for n in w.module.graph.nodes if n.op == "placeholder")
    obs = w.module.get_submodule(next(iter(placeholder.users)).target).activation_post_process
    assert obs.symmetric and obs.range_shrink_percentile == 0.0


def test_user_qconfig_is_used_globally() -> None:
    user = QConfig(activation=default_qat_qconfig.activation, weight=default_qat_qconfig.weight)
    mapping = get_qconfig_mapping(user)
    assert mapping.global_qconfig is user
    assert qconfig_type_name(user) == "custom"


def test_user_qconfig_mapping_is_used_as_is() -> None:
    mapping = QConfigMapping().set_global(default_qat_qconfig)
    assert get_qconfig_mapping(mapping) is mapping


def test_wrong_qconfig_kind_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="qconfig_type must be"):
        get_qconfig_mapping(42)  # type: ignore[arg-type]


class _ScaledScores(nn.Module):
    """Attention's ``q @ k^T * scale``: a product by a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) * 0.125
        return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("qconfig_type", ["WC8_AT8", "WT8SYMP2_AT8SYMP2"])
def test_product_by_a_number_gets_its_own_scale(qconfig_type: str) -> None:
    """torch's native config quantizes ``x * 0.125`` on ``x``'s grid (an eighth of the range, 3 bits lost before
    the Softmax); here it has its own observer, calibrated on the product's range."""
    w = _calibrated(qconfig_type, model=seeded(_ScaledScores()).eval(), shape=(2, 6, 8))
    matmul = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    matmul_fq_node = next(iter(matmul.users))
    mul = next(iter(matmul_fq_node.users))
    assert mul.op == "call_function" and mul.target.__name__ == "mul"
    matmul_fq = w.module.get_submodule(matmul_fq_node.target)
    mul_fq = w.module.get_submodule(next(iter(mul.users)).target)
    assert mul_fq is not matmul_fq
    assert float(mul_fq.scale) == pytest.approx(float(matmul_fq.scale) / 8, rel=0.05 if qconfig_type == "WC8_AT8" else 0)


class _SignedValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-2, -1)), dim=-1)
        return torch.matmul(scores, self.v(x))


@pytest.mark.parametrize(("qconfig_type", "signed"), [("WT8SYMP2_AT8SYMP2", True), ("WC8_AT8", False)])
def test_softmax_beside_signed_values_is_int8_for_the_tda4vm_type(qconfig_type: str, signed: bool) -> None:
    """TDA4VM takes no signed x unsigned MatMul (edgeai-tidl-tools rel_11_00 supported_ops_rts_versions.md L18):
    the attention probabilities meeting a signed V are int8 for the TDA4VM type, uint8 (one more bit) elsewhere."""
    w = _calibrated(qconfig_type, model=seeded(_SignedValues()).eval(), shape=(2, 3, 4))
    softmax = next(n for n in w.module.graph.nodes if n.op == "call_function" and n.target is torch.softmax)
    fq = w.module.get_submodule(next(iter(softmax.users)).target)
    assert (fq.dtype == torch.qint8) is signed and fq.zero_point.item() == 0
    assert _observer_of(w, "v").symmetric and _observer_of(w, "v").dtype == torch.qint8
