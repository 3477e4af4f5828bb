"""TIDLQuantizer: TI's qconfig types and TIDL's graph rules as a torchao PT2E ``Quantizer`` (torch.export path).

The PT2E flow (torchao 0.18: ``torch.export`` -> ``prepare_pt2e`` / ``prepare_qat_pt2e`` -> calibrate or train ->
``convert_pt2e``) asks a quantizer to annotate the ATen graph: which tensors get an observer or fake-quant, which
share one. :class:`TIDLQuantizer` annotates it the way the FX path's rules do (:mod:`tiexport.quantization.qconfig`),
with the same observers and fake-quant (:mod:`tiexport.quantization.observers`, :mod:`.fake_quantize`):

- the six named types (``QCONFIG_TYPES``): weights int8 symmetric per-channel (axis 0) or per-tensor, power-of-2
  where the type says; activations uint8 affine or symmetric (zero point 0: uint8 for non-negative tensors, int8
  otherwise), power-of-2 and range shrink as the type says; ConvTranspose weights per-tensor for every type;
- what FX's native pattern set does: Conv/Linear (+BatchNorm in QAT) (+ReLU/ReLU6/Hardtanh) quantized once at the
  end of the fused chain, element-wise Add/Mul (+ReLU) likewise; ops that move values without computing new ones
  (reshape, view, permute, transpose, flatten, squeeze, max pooling, average pooling, mean, nearest/bilinear resize,
  standalone ReLU, dropout) share their input's fake-quant instead of getting their own Q/DQ; Sigmoid, Softmax,
  Hardsigmoid have the fixed output ``1/256`` uint8 and Tanh ``1/128`` int8; LayerNorm's affine parameters stay
  float;
- Concat inputs and output share one fake-quant (one scale), and so do Add inputs for ``WT8SYMP2_AT8SYMP2``;
- after the fake-quants exist (``prepare_obs_or_fq_callback``), the FX path's symmetric rules: network inputs
  symmetric and never range-shrunk, MatMul inputs symmetric unless fed by Softmax/ReLU/Sigmoid (and then an int8
  output), inputs and outputs of Mul/Div/Sub/Max/Min, pooling and resize symmetric.

Every fake-quant is a :class:`TidlPT2EFakeQuantize` (PTC too, as on the FX path, whose PTC is QAT without backward),
a ``TidlFakeQuantize`` that torchao also recognizes as its own, so ``convert_pt2e`` converts it and
``tiexport.export`` exports the prepared model as it is.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch.ao.quantization import FixedQParamsFakeQuantize, FixedQParamsObserver
from torch.fx import GraphModule, Node

from tiexport import compat
from tiexport.errors import UsageError
from tiexport.quantization.bias_calibration import BiasCalibrator, _Target
from tiexport.quantization.fake_quantize import TidlFakeQuantize
from tiexport.quantization.observers import (
    DEFAULT_RANGE_AGGREGATION,
    DEFAULT_RANGE_SHRINK_PERCENTILE,
    POWER_OF_2_RANGE_AGGREGATION,
    ActivationObserver,
)
from tiexport.quantization.qconfig import QCONFIG_TYPES, QConfigType, qconfig_type_name

__all__ = [
    "PT2EBiasCalibrator",
    "TIDLQuantizer",
    "TidlPT2EFakeQuantize",
    "TidlPT2EFixedQParamsFakeQuantize",
    "has_batch_norm",
    "init_weight_fake_quants",
    "name_fake_quants",
    "plain_train_eval",
    "qconfig_type_for_device",
    "set_graph_modes",
]

log = logging.getLogger(__name__)

_ao = compat.torchao_pt2e()  # ImportError with the install hint when torchao is missing


class TidlPT2EFakeQuantize(TidlFakeQuantize, _ao.FakeQuantizeBase):  # type: ignore[name-defined]
    """:class:`TidlFakeQuantize`, also an instance of torchao's ``FakeQuantizeBase``: torchao's ``convert_pt2e``
    converts only its own observer classes. Numerics, observers and export are TidlFakeQuantize's."""

    with_args: Any = classmethod(_ao.with_args)


class TidlPT2EFixedQParamsFakeQuantize(FixedQParamsFakeQuantize, _ao.FakeQuantizeBase):  # type: ignore[name-defined]
    """torch's fixed-parameter fake-quant (Sigmoid/Softmax/Tanh outputs) as a torchao fake-quant. PT2E's prepare
    passes the spec's dtype and range to every constructor; the observer given here already fixes them."""

    with_args: Any = classmethod(_ao.with_args)

    def __init__(self, observer: Any = FixedQParamsObserver, **_spec: Any) -> None:
        super().__init__(observer=observer)


def qconfig_type_for_device(device: str) -> str:
    """The named type a device takes: per-tensor symmetric power-of-2 on MMAv1 (TDA4VM), symmetric power-of-2 or
    affine power-of-2 where the device needs power-of-2 scales, ``WC8_AT8`` otherwise (from its DeviceProfile)."""
    from tiexport.devices import get_device

    profile = get_device(device)
    if profile.power_of_two_scales:
        if not profile.per_channel_weights:
            return "WT8SYMP2_AT8SYMP2"
        return "WC8P2_AT8P2" if profile.asymmetric_activations else "WC8SYMP2_AT8SYMP2"
    return "WC8_AT8"


# --- what the ATen graph's ops are ----------------------------------------------------------------------------
_aten = torch.ops.aten
_WEIGHTED = {
    _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.linear.default,
    _aten.conv1d.padding, _aten.conv2d.padding, _aten.conv3d.padding,
}
_TRANSPOSED = {_aten.conv_transpose1d.default, _aten.conv_transpose2d.input, _aten.conv_transpose3d.input}
_BATCH_NORM = {_aten.batch_norm.default, _aten._native_batch_norm_legit.default,
               _aten._native_batch_norm_legit_no_training.default, _aten.cudnn_batch_norm.default}
_RELU = {_aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default,
         _aten.clamp.default, _aten.clamp_.default}
_BINARY = {_aten.add.Tensor, _aten.add_.Tensor, _aten.mul.Tensor, _aten.mul_.Tensor, _aten.sub.Tensor,
           _aten.div.Tensor, _aten.maximum.default, _aten.minimum.default}
_ADD = {_aten.add.Tensor, _aten.add_.Tensor}
_CAT = {_aten.cat.default, _aten.concat.default}
_MATMUL = {_aten.matmul.default, _aten.bmm.default, _aten.mm.default}
# no own Q/DQ: the output shares the input's fake-quant (torch's native "share qparams" ops)
_SHARE_INPUT = {
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.permute.default,
    _aten.transpose.int, _aten.flatten.using_ints, _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default,
    _aten.unsqueeze.default, _aten.t.default, _aten.contiguous.default, _aten.clone.default, _aten.expand.default,
    _aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default, _aten.avg_pool1d.default,
    _aten.avg_pool2d.default, _aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool2d.default,
    _aten.mean.dim, _aten.upsample_nearest2d.vec, _aten.upsample_nearest2d.default,
    _aten.upsample_bilinear2d.vec, _aten.upsample_bilinear2d.default, _aten.dropout.default,
    _aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default,
    _aten.pixel_shuffle.default, _aten.slice.Tensor, _aten.select.int,
}
_MULTI_OUTPUT = {_aten.split.Tensor, _aten.split_with_sizes.default, _aten.chunk.default, _aten.unbind.int}
_RANGE_0TO1 = {_aten.sigmoid.default, _aten.sigmoid_.default, _aten.softmax.int, _aten._softmax.default,
               _aten.hardsigmoid.default, _aten.hardsigmoid_.default}
_RANGE_NEG1TO1 = {_aten.tanh.default, _aten.tanh_.default}
_LAYER_NORM = {_aten.layer_norm.default, _aten.native_layer_norm.default}
# computed ops that get an input and an output fake-quant of their own
_COMPUTED = {
    _aten.gelu.default, _aten.silu.default, _aten.hardswish.default, _aten.leaky_relu.default, _aten.elu.default,
    _aten.sum.dim_IntList, _aten.pow.Tensor_Scalar, _aten.sqrt.default, _aten.exp.default, _aten.neg.default,
    _aten.abs.default, _aten.mul.Scalar, _aten.div.Scalar, _aten.add.Scalar, _aten.sub.Scalar,
}
# the FX rules' sets in ATen spelling
_NON_NEGATIVE = {_aten.relu.default, _aten.relu_.default, _aten.softmax.int, _aten._softmax.default,
                 _aten.sigmoid.default, _aten.sigmoid_.default, _aten.hardtanh.default, _aten.hardtanh_.default}
_SYMMETRIC_LAYERS = {
    _aten.mul.Tensor, _aten.mul_.Tensor, _aten.div.Tensor, _aten.sub.Tensor, _aten.maximum.default,
    _aten.minimum.default, _aten.max_pool1d.default, _aten.max_pool2d.default, _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool2d.default, _aten.upsample_nearest2d.vec, _aten.upsample_nearest2d.default,
    _aten.upsample_bilinear2d.vec, _aten.upsample_bilinear2d.default,
}
_PASS_THROUGH = {
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.permute.default,
    _aten.transpose.int, _aten.flatten.using_ints, _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default,
    _aten.unsqueeze.default, _aten.t.default, _aten.contiguous.default, _aten.clone.default, _aten.expand.default,
    _aten.slice.Tensor, _aten.select.int, operator.getitem, *_MULTI_OUTPUT,
}


def _is_float_tensor(node: Any) -> bool:
    if not isinstance(node, Node):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class TIDLQuantizer(_ao.Quantizer):  # type: ignore[name-defined]
    """A torchao PT2E ``Quantizer`` for TIDL; see the module docstring.

    ``qconfig_type``: one of the six named types (``DEFAULT`` is ``WC8_AT8``); when None, ``device`` picks it
    (:func:`qconfig_type_for_device`; neither given: ``WC8_AT8``). ``range_shrink_percentile`` overrides the
    percent clipped at each end of activation ranges (types with range shrink only), as on the FX path.
    After ``prepare_pt2e`` the quantizer's ``rules`` says which fake-quants the symmetric rules changed.
    """

    def __init__(self, qconfig_type: str | None = None, device: str | None = None, *,
                 range_shrink_percentile: float | None = None) -> None:
        super().__init__()
        if qconfig_type is None:
            qconfig_type = qconfig_type_for_device(device) if device is not None else "WC8_AT8"
        if not isinstance(qconfig_type, str):
            raise UsageError("TIDLQuantizer takes a qconfig type name; for your own observers write a torchao "
                             f"Quantizer (got {type(qconfig_type).__name__})")
        self.qconfig_type = qconfig_type_name(qconfig_type)
        self.device = device
        self.spec: QConfigType = QCONFIG_TYPES[self.qconfig_type]
        spec = self.spec
        if spec.range_shrink:
            percentile = DEFAULT_RANGE_SHRINK_PERCENTILE if range_shrink_percentile is None else range_shrink_percentile
            if not 0.0 <= float(percentile) < 50.0:
                raise UsageError(f"range_shrink_percentile must be a percent in [0, 50), got {percentile}")
        else:
            if range_shrink_percentile:
                raise UsageError(f"{spec.name} keeps the full activation range; range_shrink_percentile must be 0 "
                                 "or None")
            percentile = 0.0
        aggregation = ((POWER_OF_2_RANGE_AGGREGATION if spec.activation_power_of_2 else DEFAULT_RANGE_AGGREGATION)
                       if spec.range_shrink else "max")
        qs = _ao.QuantizationSpec
        self.activation = qs(
            dtype=torch.quint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
            observer_or_fake_quant_ctr=TidlPT2EFakeQuantize.with_args(
                observer=ActivationObserver, symmetric=spec.activation_symmetric,
                power_of_2=spec.activation_power_of_2, range_shrink_percentile=float(percentile),
                range_aggregation=aggregation))
        self.weight = self._weight_spec(per_channel=spec.weight_per_channel)
        self.weight_per_tensor = self._weight_spec(per_channel=False)
        self.range_0to1 = qs(
            dtype=torch.quint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
            observer_or_fake_quant_ctr=TidlPT2EFixedQParamsFakeQuantize.with_args(
                observer=FixedQParamsObserver.with_args(scale=1.0 / 256.0, zero_point=0, dtype=torch.quint8,
                                                        quant_min=0, quant_max=255)))
        self.range_neg1to1 = qs(
            dtype=torch.qint8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
            observer_or_fake_quant_ctr=TidlPT2EFixedQParamsFakeQuantize.with_args(
                observer=FixedQParamsObserver.with_args(scale=1.0 / 128.0, zero_point=0, dtype=torch.qint8,
                                                        qscheme=torch.per_tensor_symmetric, quant_min=-128,
                                                        quant_max=127)))
        self.rules: dict[str, list[str]] = {}

    def _weight_spec(self, per_channel: bool) -> Any:
        from tiexport.quantization.observers import WeightObserver

        return _ao.QuantizationSpec(
            dtype=torch.qint8, quant_min=-128, quant_max=127,
            qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
            ch_axis=0 if per_channel else None,
            observer_or_fake_quant_ctr=TidlPT2EFakeQuantize.with_args(
                observer=WeightObserver, per_channel=per_channel, ch_axis=0, power_of_2=self.spec.weight_power_of_2))

    def __repr__(self) -> str:
        return f"TIDLQuantizer(qconfig_type={self.qconfig_type!r}, device={self.device!r})"

    # --- annotation ---------------------------------------------------------------------------------------------
    def annotate(self, model: GraphModule) -> GraphModule:
        annotated: set[Node] = set()  # nodes whose output has a qspec
        for node in model.graph.nodes:
            if node.op != "call_function" or node in annotated or _ao.Q_ANNOTATION_KEY in node.meta:
                continue
            target = node.target
            if target in _WEIGHTED or target in _TRANSPOSED:
                self._annotate_weighted(node, annotated)
            elif target in _CAT:
                self._annotate_cat(node, annotated)
            elif target in _BINARY and all(_is_float_tensor(a) for a in node.args[:2]):
                self._annotate_binary(node, annotated)
            elif target in _SHARE_INPUT and _is_float_tensor(node.args[0] if node.args else None):
                self._annotate_share_input(node, annotated)
            elif target in _MULTI_OUTPUT and _is_float_tensor(node.args[0] if node.args else None):
                self._annotate(node, {node.args[0]: self.activation}, None)
            elif target in _RANGE_0TO1 or target in _RANGE_NEG1TO1:
                out = self.range_0to1 if target in _RANGE_0TO1 else self.range_neg1to1
                if target in _RANGE_0TO1 and self.spec.matmul_same_sign and _meets_signed_in_matmul(node):
                    out = self.range_neg1to1  # TDA4VM: int8 beside a signed MatMul input (see QConfigType)
                self._annotate(node, {node.args[0]: self.activation}, out)
                annotated.add(node)
            elif target in _MATMUL or target in _LAYER_NORM or target in _COMPUTED:
                inputs = [a for a in node.args[: 2 if target in _MATMUL else 1] if _is_float_tensor(a)]
                if inputs and _is_float_tensor(node):
                    self._annotate(node, dict.fromkeys(inputs, self.activation), self.activation)
                    annotated.add(node)
        return model

    def validate(self, model: GraphModule) -> None:
        pass

    def _annotate(self, node: Node, inputs: dict[Any, Any], output: Any) -> None:
        node.meta[_ao.Q_ANNOTATION_KEY] = _ao.QuantizationAnnotation(
            input_qspec_map={k: v for k, v in inputs.items() if isinstance(k, Node)}, output_qspec=output,
            _annotated=True)

    def _fused_tail(self, node: Node, ops: Iterable[set[Any]]) -> list[Node]:
        """The chain ``node -> op -> op ...`` of single-user ops from ``ops`` in that order (each optional)."""
        chain: list[Node] = []
        current = node
        for group in ops:
            user = _single_user(current)
            if user is not None and user.op == "call_function" and user.target in group and user.args[0] is current:
                chain.append(user)
                current = user
        return chain

    def _annotate_weighted(self, node: Node, annotated: set[Node]) -> None:
        x, weight = node.args[0], node.args[1]
        weight_spec = self.weight_per_tensor if node.target in _TRANSPOSED else self.weight
        inputs = {x: self.activation, weight: weight_spec}
        chain = self._fused_tail(node, (_BATCH_NORM, _RELU))
        last = chain[-1] if chain else node
        if chain and chain[0].target in _BATCH_NORM and chain[0].target is not _aten.batch_norm.default:
            # native batch norm returns a tuple: its value is getitem 0
            item = _single_user(chain[0])
            last = item if item is not None else last
            rest = self._fused_tail(last, (_RELU,))
            chain = [*chain[:1], *([item] if item is not None else []), *rest]
            last = chain[-1]
        self._annotate(node, inputs, None if chain else self.activation)
        for inner in chain[:-1]:
            inner.meta[_ao.Q_ANNOTATION_KEY] = _ao.QuantizationAnnotation(_annotated=True)
            annotated.add(inner)
        if chain:
            self._annotate(last, {}, self.activation)
        annotated.update([node, last])

    def _annotate_binary(self, node: Node, annotated: set[Node]) -> None:
        a, b = node.args[0], node.args[1]
        shared = node.target in _ADD and self.spec.align_add_inputs
        inputs = {a: self.activation, b: (_ao.SharedQuantizationSpec((a, node)) if shared else self.activation)}
        if a is b:
            inputs = {a: self.activation}
        chain = self._fused_tail(node, (_RELU,)) if node.target in (_ADD | {_aten.mul.Tensor}) else []
        self._annotate(node, inputs, None if chain else self.activation)
        if chain:
            self._annotate(chain[0], {}, self.activation)
            annotated.add(chain[0])
        annotated.add(node)

    def _annotate_cat(self, node: Node, annotated: set[Node]) -> None:
        tensors = [t for t in node.args[0] if _is_float_tensor(t)] if isinstance(node.args[0], (list, tuple)) else []
        if not tensors:
            return
        first = tensors[0]
        inputs: dict[Any, Any] = {first: self.activation}
        for t in tensors[1:]:
            inputs.setdefault(t, _ao.SharedQuantizationSpec((first, node)))
        self._annotate(node, inputs, _ao.SharedQuantizationSpec((first, node)))
        annotated.add(node)

    def _annotate_share_input(self, node: Node, annotated: set[Node]) -> None:
        x = node.args[0]
        self._annotate(node, {x: self.activation}, _ao.SharedQuantizationSpec((x, node)))
        annotated.add(node)

    # --- the symmetric rules, on the fake-quants prepare made -----------------------------------------------------
    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq: dict[Any, Any]) -> None:
        fqs = edge_or_node_to_obs_or_fq
        changed: dict[str, list[str]] = {"network_inputs": [], "matmul_inputs": [], "symmetric_layers": []}
        names: dict[int, str] = {}
        for key, fq in fqs.items():
            names.setdefault(id(fq), key.name if isinstance(key, Node) else f"{key[0].name}->{key[1].name}")

        def observer(key: Any) -> ActivationObserver | None:
            obs = getattr(fqs.get(key), "activation_post_process", None)
            return obs if isinstance(obs, ActivationObserver) else None

        def make_symmetric(key: Any, rule: str, force_signed: bool = False) -> None:
            obs = observer(key)
            if obs is None:
                return
            if not obs.symmetric or (force_signed and not obs.force_signed):
                changed[rule].append(names.get(id(fqs[key]), str(key)))
            obs.symmetric = True
            obs.force_signed = obs.force_signed or force_signed

        def keys_of(value: Node, user: Node) -> list[Any]:
            """The fake-quant keys that hold ``value`` as ``user`` sees it, looking back through pass-through ops."""
            keys: list[Any] = []
            edge: Any = (value, user)
            current: Node | None = value
            while True:
                for key in (edge, current):
                    if key in fqs and key not in keys:
                        keys.append(key)
                if current is None or current.op != "call_function" or current.target not in _PASS_THROUGH:
                    break
                nxt = current.args[0] if current.args and isinstance(current.args[0], Node) else None
                if nxt is None:
                    break
                edge, current = (nxt, current), nxt
            return keys

        def producer(value: Node) -> Node:
            current = value
            while current.op == "call_function" and current.target in _PASS_THROUGH and current.args \
                    and isinstance(current.args[0], Node):
                current = current.args[0]
            return current

        for key in fqs:
            if isinstance(key, tuple) and key[0].op == "placeholder":
                make_symmetric(key, "network_inputs")
                obs = observer(key)
                if obs is not None:
                    obs.range_shrink_percentile = 0.0
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _MATMUL:
                signed_input = False
                non_negative: list[Any] = []
                for arg in node.args[:2]:
                    if not isinstance(arg, Node):
                        continue
                    if producer(arg).target in _NON_NEGATIVE:
                        non_negative.extend(keys_of(arg, node))
                        continue
                    keys = keys_of(arg, node)
                    signed_input = signed_input or bool(keys)
                    for key in keys:
                        make_symmetric(key, "matmul_inputs")
                if signed_input and node in fqs:
                    make_symmetric(node, "matmul_inputs", force_signed=True)
                if signed_input and self.spec.matmul_same_sign:
                    for key in non_negative:  # TDA4VM: no signed x unsigned MatMul (see QConfigType)
                        make_symmetric(key, "matmul_inputs", force_signed=True)
            elif node.target in _SYMMETRIC_LAYERS:
                for arg in node.args:
                    if isinstance(arg, Node):
                        for key in keys_of(arg, node):
                            make_symmetric(key, "symmetric_layers")
                if node in fqs:
                    make_symmetric(node, "symmetric_layers")
        self.rules = changed
        for rule, which in changed.items():
            if which:
                log.debug("graph rule %s made symmetric: %s", rule, ", ".join(which))


# --- the prepared graph: names, weights, modes, bias calibration ----------------------------------------------------


def _fake_quant_nodes(gm: GraphModule) -> list[Node]:
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    # prepare registers a shared fake-quant under several names: look every name up
    modules = dict(gm.named_modules(remove_duplicate=False))
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules.get(str(n.target)), (FakeQuantizeBase,
                                                                                 _ao.FakeQuantizeBase))]


def _source_module(node: Node) -> str:
    """The qualified name of the innermost module whose forward computed ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").strip(".")


def _stored_weight(node: Node) -> Node | None:
    """The stored tensor a weight fake-quant's input is computed from (QAT Conv+BN scales it first)."""
    seen: list[Node] = [node]
    while seen:
        current = seen.pop(0)
        if current.op == "get_attr":
            return current
        if current.op == "call_function":
            seen.extend(a for a in current.args if isinstance(a, Node))
    return None


def _fake_quant_base_name(node: Node) -> str | None:
    source = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if source is None:
        return None
    is_weight = any(u.op == "call_function" and (u.target in _WEIGHTED or u.target in _TRANSPOSED)
                    and len(u.args) > 1 and u.args[1] is node for u in node.users)
    stored = _stored_weight(source) if is_weight or source.op == "get_attr" else None
    if stored is not None:
        return f"{stored.target}_fake_quant"
    if source.op == "placeholder":
        return f"{source.name}_activation_post_process"
    module = _source_module(source)
    return f"{module}.activation_post_process" if module else f"{source.name}_activation_post_process"


def name_fake_quants(gm: GraphModule) -> dict[str, str]:
    """Rename the fake-quants ``prepare_pt2e`` made (``activation_post_process_<n>``) after what they quantize, in
    place, so that Q/DQ node names in the export say where they come from: a weight's is ``<weight>_fake_quant``
    (``stem.0.weight_fake_quant``, as on the FX path), an activation's ``<module>.activation_post_process`` for the
    module whose output it quantizes (``stem.2.activation_post_process``; ``_1``... for more in one module), a root
    function's ``<op>_activation_post_process`` (``cat_activation_post_process``), a network input's
    ``<input>_activation_post_process``. A fake-quant shared by several ops keeps the name of its first use.
    Returns old name -> new name."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    taken = set(modules) | {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    by_instance: dict[int, str] = {}
    renamed: dict[str, str] = {}
    for node in _fake_quant_nodes(gm):
        old = str(node.target)
        if not old.startswith("activation_post_process_") or "." in old:
            continue
        fq = modules[old]
        new = by_instance.get(id(fq))
        if new is None:
            base = _fake_quant_base_name(node)
            if base is None:
                continue
            new, k = base, 0
            while new in taken:
                k += 1
                new = f"{base}_{k}"
            try:
                gm.add_submodule(new, fq)
            except (AttributeError, TypeError):  # a dotted path through a non-module attribute: keep the old name
                continue
            taken.add(new)
            by_instance[id(fq)] = new
        renamed[old] = new
        node.target = new
    for old in renamed:
        if hasattr(gm, old):
            delattr(gm, old)
    if renamed:
        gm.recompile()
    return renamed


def init_weight_fake_quants(gm: GraphModule) -> None:
    """Give every weight fake-quant whose input is a stored weight its scale now, before any forward (observers
    frozen from the start would keep the placeholder scale otherwise; the FX path's ``init_weight_qparams``)."""
    modules = dict(gm.named_modules())
    with torch.no_grad():
        for node in _fake_quant_nodes(gm):
            source = node.args[0] if node.args else None
            if isinstance(source, Node) and source.op == "get_attr":
                value: Any = gm
                for part in str(source.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    fq = modules[str(node.target)]
                    observed = bool(fq.observer_enabled[0] == 1)
                    fq.enable_observer()
                    fq(value.detach())
                    if not observed:
                        fq.disable_observer()


_BN_TRAINING_ARG = {_aten.batch_norm.default: 5}
_DROPOUT_TRAINING_ARG = {_aten.dropout.default: 2, _aten.feature_dropout.default: 2}


def set_graph_modes(gm: GraphModule, *, batch_norm_training: bool, dropout_training: bool) -> bool:
    """Set the ``training`` argument of every batch-norm and dropout op in a torch.export graph, in place: ops
    captured in the graph do not follow ``module.train()``. Batch norm with ``training=False`` normalizes with its
    running statistics and leaves them alone (frozen statistics). Returns whether anything changed."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index = _BN_TRAINING_ARG.get(node.target)
        want = batch_norm_training
        if index is None:
            index, want = _DROPOUT_TRAINING_ARG.get(node.target), dropout_training
        if index is None or len(node.args) <= index or node.args[index] == want:
            continue
        args = list(node.args)
        args[index] = want
        node.args = tuple(args)
        changed = True
    if changed:
        gm.recompile()
    return changed


def has_batch_norm(gm: GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in _BATCH_NORM for n in gm.graph.nodes)


def plain_train_eval(gm: GraphModule) -> None:
    """Make ``train()``/``eval()`` of a torch.export GraphModule plain ``nn.Module`` ones (flags only). torchao
    replaces them by errors; the PT2E wrappers set the graph's batch-norm and dropout ops themselves
    (:func:`set_graph_modes`), and ``tiexport.export`` and parity set flags."""
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)


class PT2EBiasCalibrator(BiasCalibrator):
    """:class:`~tiexport.quantization.bias_calibration.BiasCalibrator` on a PT2E graph: the layers are ATen
    conv/linear calls whose bias is a stored tensor (batch norm's shift in a QAT Conv+BN), followed by an optional
    batch norm and ReLU, then a fake-quant."""

    @staticmethod
    def _find_targets(graph_module: GraphModule) -> list[_Target]:
        modules = dict(graph_module.named_modules(remove_duplicate=False))
        calls: dict[int, int] = {}
        call_of: dict[Node, int] = {}
        fq_nodes = set(_fake_quant_nodes(graph_module))
        for node in graph_module.graph.nodes:
            if node in fq_nodes:
                module = modules[str(node.target)]
                call_of[node] = calls.get(id(module), 0)
                calls[id(module)] = call_of[node] + 1

        def stored(value: Any) -> torch.Tensor | None:
            if not (isinstance(value, Node) and value.op == "get_attr"):
                return None
            obj: Any = graph_module
            for part in str(value.target).split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) and obj.is_floating_point() else None

        targets: list[_Target] = []
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target not in _WEIGHTED:
                continue
            bias = stored(node.args[2]) if len(node.args) > 2 else None
            current = node
            while len(current.users) == 1:
                user = next(iter(current.users))
                if user.op == "call_function" and user.target in _BATCH_NORM and user.args[0] is current:
                    bias = stored(user.args[2])
                elif not (user.op == "call_function" and (user.target in _RELU or user.target is operator.getitem
                                                          or user.target in (_aten.div.Tensor, _aten.add.Tensor))):
                    break
                current = user
            users = list(current.users)
            if bias is None or len(users) != 1 or users[0] not in fq_nodes:
                continue
            dim = -1 if node.target is _aten.linear.default else 1
            bias_param = bias if isinstance(bias, torch.nn.Parameter) else torch.nn.Parameter(bias, requires_grad=False)
            if bias_param is not bias:
                continue  # a plain tensor attribute: the correction must write the graph's own tensor
            targets.append(_Target(node.name, bias_param, modules[str(users[0].target)], dim, call_of[users[0]]))
        return targets


def _meets_signed_in_matmul(node: Node) -> bool:
    """``node``'s output (through pass-through ops) is one input of a MatMul whose other input is not produced by a
    non-negative op."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in _PASS_THROUGH:
                frontier.append(user)
            elif user.target in _MATMUL:
                for other in user.args[:2]:
                    if not isinstance(other, Node) or other is current:
                        continue
                    src = other
                    while src.op == "call_function" and src.target in _PASS_THROUGH and src.args \
                            and isinstance(src.args[0], Node):
                        src = src.args[0]
                    if src.target not in _NON_NEGATIVE:
                        return True
    return False
