"""TI's named qconfig types, resolved to a torch ``QConfigMapping``, plus the graph rules TIDL needs.

The names are the ones users already write with TI's wrapper (shared wrapper reference, "qconfig types"):

| type | weights | activations | range shrink |
|---|---|---|---|
| ``WC8_AT8`` (default) | int8 per-channel symmetric | uint8 per-tensor affine | yes |
| ``MSA_WC8_AT8`` | as WC8_AT8 | as WC8_AT8 | no (full range) |
| ``WT8SYMP2_AT8SYMP2`` | int8 per-tensor symmetric power-of-2 | per-tensor symmetric power-of-2 | yes |
| ``WC8SYMP2_AT8SYMP2`` | int8 per-channel symmetric power-of-2 | per-tensor symmetric power-of-2 | yes |
| ``WC8P2_AT8P2`` | int8 per-channel symmetric power-of-2 | uint8 per-tensor affine power-of-2 | yes |
| ``MSA_WC8P2_AT8P2`` | as WC8P2_AT8P2 | as WC8P2_AT8P2 | no |

"Symmetric" activations have zero point 0: uint8 for non-negative tensors, int8 otherwise (tidl.md §2).
``DEFAULT`` is ``WC8_AT8`` (TI's code maps it to the MSA type while its comment says WC8_AT8; here it is what the
comment says). ``WT8SYMP2_AT8SYMP2`` is the TDA4VM choice (tidl.md §1: per-tensor, symmetric, power-of-2).

Ops whose output range is known get fixed quantization parameters, as in torch's default mapping: Sigmoid, Softmax,
Hardsigmoid ``scale 1/256``, zero point 0, uint8 (already a power of two and symmetric); Tanh ``scale 1/128``, zero
point 0, int8 (the same grid as torch's uint8 with zero point 128, but symmetric as TIDL wants for Tanh, tidl.md §2).
ConvTranspose weights are per-tensor for every type: TIDL's Deconv takes per-tensor weights only (tidl.md §2) and
torch's per-channel axis 0 would be the input-channel axis there.

Graph rules applied after ``prepare`` (:func:`apply_graph_rules`), for the named types:

- MatMul inputs are symmetric unless fed by Softmax, Relu or Sigmoid (tidl.md §2, "MatMul: signed inputs with
  unsigned output unsupported"; TI's v2 wrapper does the same), and then its output is int8. For
  ``WT8SYMP2_AT8SYMP2`` a non-negative input beside a signed one is int8 as well: TDA4VM takes no signed x unsigned
  MatMul (edgeai-tidl-tools rel_11_00 docs/supported_ops_rts_versions.md L18).
- Inputs and outputs of the layers TIDL runs symmetric only are symmetric: element-wise ops other than Add, pooling,
  resize (tidl.md §2, per-layer table). On non-negative tensors this costs nothing: uint8 with zero point 0 is the
  grid affine quantization would pick anyway.
- Concat inputs share one fake-quant (one scale), and so do Add inputs for ``WT8SYMP2_AT8SYMP2``: TDA4VM's
  fix pipeline aligns them after export otherwise, with numerics the model never saw.
- Network inputs are symmetric (tidl.md §2: "The network input should be quantized symmetric, per-tensor") and
  never range-shrunk: clipping input pixels loses information that no later layer can recover.

Users may pass their own ``QConfig`` (used globally, with torch's fixed-parameter qconfigs for Sigmoid/Softmax/Tanh)
or a complete ``QConfigMapping`` (used as is). Neither gets the graph rules: the user chose the observers.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.ao.quantization import (
    FixedQParamsFakeQuantize,
    FixedQParamsObserver,
    QConfig,
    QConfigMapping,
    default_fixed_qparams_range_0to1_fake_quant,
    default_placeholder_observer,
    default_reuse_input_qconfig,
)
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    DTypeConfig,
    ObservationType,
    get_native_backend_config,
)

# BackendConfig.set_backend_pattern_config needs this submodule loaded; torch only imports it from quantize_fx
from torch.ao.quantization.backend_config import utils as _backend_config_utils  # noqa: F401
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule, Node

from tiexport.errors import UsageError
from tiexport.quantization.fake_quantize import TidlFakeQuantize
from tiexport.quantization.observers import (
    DEFAULT_RANGE_AGGREGATION,
    DEFAULT_RANGE_SHRINK_PERCENTILE,
    POWER_OF_2_RANGE_AGGREGATION,
    ActivationObserver,
    WeightObserver,
)

__all__ = [
    "BACKENDS",
    "QCONFIG_TYPES",
    "QConfigType",
    "apply_graph_rules",
    "get_backend_config",
    "get_qconfig",
    "get_qconfig_mapping",
    "qconfig_type_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QConfigType:
    """One named quantization scheme: how weights and activations are quantized."""

    name: str
    weight_per_channel: bool
    weight_power_of_2: bool
    activation_symmetric: bool
    activation_power_of_2: bool
    range_shrink: bool
    description: str
    align_add_inputs: bool = False
    """Both inputs of an Add share one scale (TDA4VM aligns them, so the model is calibrated and trained so)."""
    matmul_same_sign: bool = False
    """A MatMul's inputs are both signed when one is: TDA4VM takes no signed x unsigned MatMul (TI's supported-ops
    table, edgeai-tidl-tools rel_11_00 docs/supported_ops_rts_versions.md L18), so attention's Softmax output that
    meets a signed V is int8 there (one bit of the probabilities) instead of running on Arm."""


QCONFIG_TYPES: dict[str, QConfigType] = {
    t.name: t
    for t in (
        QConfigType("WC8_AT8", True, False, False, False, True,
                    "int8 per-channel symmetric weights, uint8 affine activations (MMAv2 devices)"),
        QConfigType("MSA_WC8_AT8", True, False, False, False, False,
                    "as WC8_AT8 without range shrink (attention networks with important peaks)"),
        QConfigType("WT8SYMP2_AT8SYMP2", False, True, True, True, True,
                    "per-tensor symmetric power-of-2 weights and activations (TDA4VM)", align_add_inputs=True,
                    matmul_same_sign=True),
        QConfigType("WC8SYMP2_AT8SYMP2", True, True, True, True, True,
                    "per-channel symmetric power-of-2 weights, symmetric power-of-2 activations"),
        QConfigType("WC8P2_AT8P2", True, True, False, True, True,
                    "per-channel symmetric power-of-2 weights, affine power-of-2 activations"),
        QConfigType("MSA_WC8P2_AT8P2", True, True, False, True, False,
                    "as WC8P2_AT8P2 without range shrink"),
    )
}
_ALIASES = {"DEFAULT": "WC8_AT8"}

#: Backend names TI's API accepts. They only name torch's pattern set: tiexport converts to the reference
#: representation (explicit quantize/dequantize), which does not depend on a CPU kernel library.
BACKENDS = ("qnnpack", "fbgemm", "x86", "native")

QConfigLike = str | QConfig | QConfigMapping


def _resolve_type(qconfig_type: str) -> QConfigType:
    key = _ALIASES.get(qconfig_type.upper(), qconfig_type.upper())
    if key not in QCONFIG_TYPES:
        raise UsageError(
            f"unknown qconfig_type {qconfig_type!r}; choose one of {', '.join(QCONFIG_TYPES)} "
            "or pass a torch QConfig / QConfigMapping"
        )
    return QCONFIG_TYPES[key]


def qconfig_type_name(qconfig_type: QConfigLike) -> str:
    """The canonical name written to export metadata: the type's name, or ``custom`` for a user QConfig(Mapping)."""
    if isinstance(qconfig_type, str):
        return _resolve_type(qconfig_type).name
    return "custom"


def _check_percentile(value: float) -> float:
    if not 0.0 <= float(value) < 50.0:
        raise UsageError(f"range_shrink_percentile must be a percent in [0, 50), got {value}")
    return float(value)


def get_qconfig(qconfig_type: str = "WC8_AT8", *, range_shrink_percentile: float | None = None) -> QConfig:
    """The global QConfig of a named type.

    ``range_shrink_percentile`` (percent clipped at each end of activation ranges) overrides the default
    (:data:`~tiexport.quantization.observers.DEFAULT_RANGE_SHRINK_PERCENTILE`) for non-MSA types; MSA types
    always keep the full range, so passing a non-zero value with an MSA type is a usage error.
    """
    spec = _resolve_type(qconfig_type)
    if spec.range_shrink:
        percentile = DEFAULT_RANGE_SHRINK_PERCENTILE if range_shrink_percentile is None else range_shrink_percentile
    else:
        if range_shrink_percentile:
            raise UsageError(f"{spec.name} keeps the full activation range; range_shrink_percentile must be 0 or None")
        percentile = 0.0
    activation = TidlFakeQuantize.with_args(
        observer=ActivationObserver,
        symmetric=spec.activation_symmetric,
        power_of_2=spec.activation_power_of_2,
        range_shrink_percentile=_check_percentile(percentile),
        # full range means the extremes over all batches, not an average of per-batch extremes
        range_aggregation=(
            (POWER_OF_2_RANGE_AGGREGATION if spec.activation_power_of_2 else DEFAULT_RANGE_AGGREGATION)
            if spec.range_shrink else "max"
        ),
    )
    weight = TidlFakeQuantize.with_args(
        observer=WeightObserver, per_channel=spec.weight_per_channel, ch_axis=0, power_of_2=spec.weight_power_of_2
    )
    return QConfig(activation=activation, weight=weight)


# Fixed output ranges, as torch's default mapping has them, but Tanh symmetric (int8, zero point 0).
_TANH_FAKE_QUANT = FixedQParamsFakeQuantize.with_args(
    observer=FixedQParamsObserver.with_args(
        scale=1.0 / 128.0, zero_point=0, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
        quant_min=-128, quant_max=127,
    )
)
_RANGE_0TO1_OPS: tuple[Any, ...] = (
    torch.nn.Hardsigmoid, torch.nn.functional.hardsigmoid, "hardsigmoid", "hardsigmoid_",
    torch.nn.Sigmoid, torch.sigmoid, "sigmoid", "sigmoid_", torch.nn.Softmax,
)
_RANGE_NEG1TO1_OPS: tuple[Any, ...] = (torch.nn.Tanh, torch.tanh, "tanh", "tanh_")
_CONV_TRANSPOSE: tuple[Any, ...] = (
    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
    torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d, torch.nn.functional.conv_transpose3d,
)


def _mapping_around(qconfig: QConfig, per_tensor_weight: Callable[..., Any] | None) -> QConfigMapping:
    mapping = QConfigMapping().set_global(qconfig).set_object_type("reshape", default_reuse_input_qconfig)
    if per_tensor_weight is not None:
        transpose_qconfig = QConfig(activation=qconfig.activation, weight=per_tensor_weight)
        for op in _CONV_TRANSPOSE:
            mapping.set_object_type(op, transpose_qconfig)
    # LayerNorm's affine parameters stay float (the reference LayerNorm takes float weights)
    layer_norm_qconfig = QConfig(activation=qconfig.activation, weight=default_placeholder_observer)
    mapping.set_object_type(torch.nn.LayerNorm, layer_norm_qconfig)
    mapping.set_object_type(torch.nn.functional.layer_norm, layer_norm_qconfig)
    range_0to1 = QConfig(activation=default_fixed_qparams_range_0to1_fake_quant, weight=qconfig.weight)
    range_neg1to1 = QConfig(activation=_TANH_FAKE_QUANT, weight=qconfig.weight)
    for op in _RANGE_0TO1_OPS:
        mapping.set_object_type(op, range_0to1)
    for op in _RANGE_NEG1TO1_OPS:
        mapping.set_object_type(op, range_neg1to1)
    return mapping


def get_qconfig_mapping(
    qconfig_type: QConfigLike = "WC8_AT8", *, range_shrink_percentile: float | None = None
) -> QConfigMapping:
    """Resolve a named type, a user ``QConfig`` or a user ``QConfigMapping`` to the mapping to prepare with."""
    if isinstance(qconfig_type, QConfigMapping):
        if range_shrink_percentile is not None:
            raise UsageError("range_shrink_percentile applies to named qconfig types, not to a QConfigMapping")
        return qconfig_type
    if isinstance(qconfig_type, QConfig):
        if range_shrink_percentile is not None:
            raise UsageError("range_shrink_percentile applies to named qconfig types, not to a QConfig")
        return _mapping_around(qconfig_type, per_tensor_weight=None)
    if not isinstance(qconfig_type, str):
        raise UsageError(
            f"qconfig_type must be a type name, a torch QConfig or a QConfigMapping, not {type(qconfig_type).__name__}"
        )
    spec = _resolve_type(qconfig_type)
    qconfig = get_qconfig(spec.name, range_shrink_percentile=range_shrink_percentile)
    per_tensor_weight = TidlFakeQuantize.with_args(
        observer=WeightObserver, per_channel=False, power_of_2=spec.weight_power_of_2
    )
    return _mapping_around(qconfig, per_tensor_weight)


def _signed_variant(config: DTypeConfig) -> DTypeConfig | None:
    if config.is_dynamic or config.input_dtype != torch.quint8 or config.output_dtype != torch.quint8:
        return None
    return DTypeConfig(
        input_dtype=torch.qint8, output_dtype=torch.qint8, weight_dtype=config.weight_dtype,
        bias_dtype=config.bias_dtype,
    )


def get_backend_config(backend: str = "qnnpack") -> BackendConfig:
    """torch's native pattern set, accepting int8 activations beside uint8, and observing MatMul in all spellings.

    torch's native config takes only uint8 activations; TIDL's symmetric activations are int8 for signed tensors,
    and fixed-range Tanh is int8, so every static uint8 dtype config gets an int8 twin. ``a @ b`` and ``torch.bmm``
    are observed like ``torch.matmul`` so attention written either way gets Q/DQ around its MatMuls (tidl.md §2).
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    native = get_native_backend_config()
    config = BackendConfig(f"tiexport_{backend}")
    for pattern_config in native.configs:
        twins = [t for t in (_signed_variant(c) for c in pattern_config.dtype_configs) if t is not None]
        pattern_config.set_dtype_configs([*pattern_config.dtype_configs, *twins])
        _own_observer_for_scalar_mul(pattern_config)
        config.set_backend_pattern_config(pattern_config)
    unsigned = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)
    signed = DTypeConfig(input_dtype=torch.qint8, output_dtype=torch.qint8)
    for op in (operator.matmul, torch.bmm, "matmul", "bmm"):
        config.set_backend_pattern_config(
            BackendPatternConfig(op)
            .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
            .set_dtype_configs([unsigned, signed])
        )
    return config


def _own_observer_for_scalar_mul(pattern_config: BackendPatternConfig) -> None:
    """``x * c`` (a Python number) gets an observer of its own instead of sharing ``x``'s.

    torch's native config shares it: the product is quantized on the input's grid. For attention's ``scores * scale``
    (1/8 for 64-wide heads) that leaves the Softmax input an eighth of the int8 range, 3 bits lost; TIDL requantizes
    at every layer anyway, so the Mul gets its own scale like every other layer.
    """
    pattern = pattern_config.pattern
    head = pattern[0] if isinstance(pattern, tuple) else pattern
    mapping = pattern_config._num_tensor_args_to_observation_type
    if head in (operator.mul, torch.mul) and mapping:
        mapping[1] = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT


# --- graph rules -------------------------------------------------------------------------------------------------

_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
# ops that move data without changing values: the quantization point of their output is that of their input
_PASS_THROUGH_FUNCTIONS = {
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, operator.getitem, torch.t,
}
_PASS_THROUGH_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "squeeze", "unsqueeze", "chunk", "split",
    "t", "expand", "view_as", "reshape_as",
}
_NON_NEGATIVE_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.softmax, torch.nn.functional.softmax, torch.sigmoid,
    torch.nn.functional.sigmoid, torch.nn.functional.relu6,
}
_NON_NEGATIVE_METHODS = {"relu", "relu_", "softmax", "sigmoid", "sigmoid_"}
_NON_NEGATIVE_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Softmax, torch.nn.Sigmoid)


def _is_fake_quant_node(node: Node, modules: dict[str, torch.nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), FakeQuantizeBase)


def _is_pass_through(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS) or (
        node.op == "call_method" and node.target in _PASS_THROUGH_METHODS
    )


def _upstream_fake_quants(node: Node, modules: dict[str, torch.nn.Module]) -> list[Node]:
    """Every fake-quant node between ``node`` and the op that computed its values, looking through reshapes and views.

    FX gives ops like reshape, permute and getitem their own fake-quant (sometimes a shared instance, sometimes a new
    one); all of them must use the same scheme, or a symmetric grid would requantize an affine one.
    """
    found: list[Node] = []
    current: Node | None = node
    while current is not None and (_is_fake_quant_node(current, modules) or _is_pass_through(current)):
        if _is_fake_quant_node(current, modules):
            found.append(current)
        current = current.args[0] if current.args and isinstance(current.args[0], Node) else None
    return found


def _producer(fq_node: Node, modules: dict[str, torch.nn.Module]) -> Node | None:
    current = fq_node.args[0] if fq_node.args and isinstance(fq_node.args[0], Node) else None
    while current is not None and (_is_pass_through(current) or _is_fake_quant_node(current, modules)):
        current = current.args[0] if current.args and isinstance(current.args[0], Node) else None
    return current


def _is_non_negative_op(node: Node | None, modules: dict[str, torch.nn.Module]) -> bool:
    if node is None:
        return False
    if node.op == "call_function":
        return node.target in _NON_NEGATIVE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _NON_NEGATIVE_METHODS
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, _NON_NEGATIVE_MODULES):
            return True
        # fused modules (ConvReLU2d, LinearReLU, ConvBnReLU2d, their QAT versions) end in a ReLU
        return type(module).__name__.endswith("ReLU") or type(module).__name__.endswith("ReLU2d") or (
            type(module).__name__.endswith(("ReLU1d", "ReLU3d"))
        )
    return False


def _activation_observer(fq: torch.nn.Module) -> ActivationObserver | None:
    observer = getattr(fq, "activation_post_process", None)
    return observer if isinstance(observer, ActivationObserver) else None


def _iter_matmuls(graph_module: GraphModule) -> Iterator[Node]:
    for node in graph_module.graph.nodes:
        if (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS
        ):
            yield node


# Layers TIDL runs on symmetric activations only (tidl.md §2, per-layer table): element-wise ops other than Add,
# pooling and resize. Symmetric costs nothing on non-negative tensors (uint8, zero point 0, the same grid as affine).
_SYMMETRIC_FUNCTIONS = {
    operator.mul, torch.mul, operator.truediv, torch.div, operator.sub, torch.sub, torch.maximum, torch.minimum,
    torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.interpolate,
}
_SYMMETRIC_METHODS = {"mul", "div", "sub", "mul_", "div_", "sub_"}
_SYMMETRIC_MODULES = (
    torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool1d,
    torch.nn.AdaptiveAvgPool2d, torch.nn.Upsample,
)


def _is_symmetric_layer(node: Node, modules: dict[str, torch.nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _SYMMETRIC_FUNCTIONS
    if node.op == "call_method":
        return node.target in _SYMMETRIC_METHODS
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), _SYMMETRIC_MODULES)


def _output_fake_quants(node: Node, modules: dict[str, torch.nn.Module]) -> list[Node]:
    return [user for user in node.users if _is_fake_quant_node(user, modules)]


_CONCAT_FUNCTIONS = {torch.cat, torch.concat}
_ADD_FUNCTIONS = {operator.add, torch.add}


def _share_fake_quants(graph_module: GraphModule, align_add_inputs: bool) -> list[str]:
    """Make the inputs of every Concat (and Add, if asked) use one fake-quant module, so they share one scale.

    TIDL requantizes inputs that arrive on different scales, and ``tiexport fix`` aligns them after export, which
    changes numerics the model was never calibrated or trained with. Sharing the module here gives the union of the
    ranges to all of them from the start, exactly as torch shares the observer of ``torch.cat``'s output. Every call
    site of a merged module is re-pointed, so shapes ops that shared it keep sharing.
    """
    # torch shares one module under several names (ops that share their input's observer): merge instances
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    merged: list[str] = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONCAT_FUNCTIONS and node.args and isinstance(node.args[0], (list, tuple)):
            inputs = list(node.args[0])
        elif align_add_inputs and node.target in _ADD_FUNCTIONS and len(node.args) >= 2:
            inputs = list(node.args[:2])
        else:
            continue
        fq_nodes = [a for a in inputs if isinstance(a, Node) and _is_fake_quant_node(a, modules)]
        if len(fq_nodes) != len(inputs):
            continue
        keep = str(fq_nodes[0].target)
        kept = _activation_observer(modules[keep])
        for other_node in fq_nodes[1:]:
            other_module = modules[str(other_node.target)]
            observer = _activation_observer(other_module)
            if other_module is modules[keep] or kept is None or observer is None:
                continue  # already shared, or not tiexport's observers
            kept.symmetric = kept.symmetric or observer.symmetric
            kept.force_signed = kept.force_signed or observer.force_signed
            kept.range_shrink_percentile = min(kept.range_shrink_percentile, observer.range_shrink_percentile)
            aliases = [name for name, m in modules.items() if m is other_module]
            for user_node in graph_module.graph.nodes:
                if user_node.op == "call_module" and user_node.target in aliases:
                    user_node.target = keep
            for name in aliases:
                graph_module.delete_submodule(name)
                modules.pop(name)
            merged.append(f"{'/'.join(aliases)}->{keep}")
    if merged:
        graph_module.recompile()
    return merged


def apply_graph_rules(graph_module: GraphModule, *, align_add_inputs: bool = False,
                      matmul_same_sign: bool = False) -> dict[str, list[str]]:
    """Make the activations TIDL needs symmetric, in place; see the module docstring. Returns changes per rule.

    - ``shared_scales``: the inputs of each Concat, and of each Add with ``align_add_inputs`` (the TDA4VM type),
      share one fake-quant module (see :func:`_share_fake_quants`).
    - ``network_inputs``: the fake-quant on each graph input: symmetric, no range shrink.
    - ``constant_inputs``: the fake-quant of a parameter or buffer read by the graph (through views), e.g. a
      position embedding: symmetric, as TIDL reads a constant behind a DequantizeLinear as a weight.
    - ``matmul_inputs``: the fake-quants feeding each MatMul (through reshapes and views) unless fed by
      Softmax/Relu/Sigmoid, and its output; when an input was made symmetric the output is int8 even if it happens
      to be non-negative (tidl.md §2: "signed inputs with unsigned output unsupported"); with ``matmul_same_sign``
      (the TDA4VM type) a non-negative input that meets a signed one is made int8 too.
    - ``symmetric_layers``: inputs and outputs of element-wise Mul/Div/Sub/Max/Min, pooling and resize.

    Works on the fake-quant modules of a freshly prepared GraphModule made with a named type; fake-quant modules
    of other kinds (a user's QConfig) are left alone.
    """
    shared = _share_fake_quants(graph_module, align_add_inputs)
    modules = dict(graph_module.named_modules(remove_duplicate=False))
    changed: dict[str, list[str]] = {
        "shared_scales": shared, "network_inputs": [], "constant_inputs": [], "matmul_inputs": [],
        "symmetric_layers": [],
    }

    def make_symmetric(fq_node: Node, rule: str, force_signed: bool = False) -> None:
        observer = _activation_observer(modules[str(fq_node.target)])
        if observer is None:
            return
        if not observer.symmetric or (force_signed and not observer.force_signed):
            changed[rule].append(str(fq_node.target))
        observer.symmetric = True
        observer.force_signed = observer.force_signed or force_signed

    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        for fq_node in _output_fake_quants(node, modules):
            make_symmetric(fq_node, "network_inputs")
            observer = _activation_observer(modules[str(fq_node.target)])
            if observer is not None:
                observer.range_shrink_percentile = 0.0
    for node in graph_module.graph.nodes:
        # a parameter quantized by an activation fake-quant (a ViT's position embedding, class token) exports as a
        # constant behind a DequantizeLinear, which TIDL reads as a weight: symmetric (zero point 0), or fix
        # requantizes it after export with numerics the model never saw
        if _is_fake_quant_node(node, modules):
            producer = _producer(node, modules)
            if producer is not None and producer.op == "get_attr":
                make_symmetric(node, "constant_inputs")
    for matmul in _iter_matmuls(graph_module):
        signed_input = False
        non_negative: list[Node] = []
        for arg in matmul.args[:2]:
            if not isinstance(arg, Node):
                continue
            fq_nodes = _upstream_fake_quants(arg, modules)
            if not fq_nodes:
                log.debug("MatMul %s: input %s has no fake-quant upstream", matmul.name, arg.name)
                continue
            if _is_non_negative_op(_producer(fq_nodes[-1], modules), modules):
                non_negative.extend(fq_nodes)
                continue
            signed_input = True
            for fq_node in fq_nodes:
                make_symmetric(fq_node, "matmul_inputs")
        if signed_input:
            for fq_node in _output_fake_quants(matmul, modules):
                make_symmetric(fq_node, "matmul_inputs", force_signed=True)
            if matmul_same_sign:
                for fq_node in non_negative:
                    make_symmetric(fq_node, "matmul_inputs", force_signed=True)
    for node in graph_module.graph.nodes:
        if not _is_symmetric_layer(node, modules):
            continue
        for arg in node.args:
            if isinstance(arg, Node):
                for fq_node in _upstream_fake_quants(arg, modules):
                    make_symmetric(fq_node, "symmetric_layers")
        for fq_node in _output_fake_quants(node, modules):
            make_symmetric(fq_node, "symmetric_layers")
    for rule, names in changed.items():
        if names:
            log.debug("graph rule %s made symmetric: %s", rule, ", ".join(names))
    return changed
