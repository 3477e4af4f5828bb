"""PTQPT2EModule and QATPT2EModule: TI v3's PT2E wrapper names over torch.export and torchao's PT2E flow.

The training loop is the FX wrappers' (:mod:`tiexport.wrappers.fx`, shared wrapper reference)::

    model = PTQPT2EModule(model, qconfig_type="WC8_AT8", example_inputs=example)  # or QATPT2EModule(model, N, ...)
    for epoch in range(model.total_epochs):
        model.train()                     # each train() call is one epoch
        for images, _ in loader:
            model(images)                 # QAT: loss, backward, optimizer step as usual
    model.eval()
    model = model.convert()               # optional: convert_pt2e's integer Q/DQ form
    model.export(example, "model.onnx", device="AM68A")   # dynamo exporter, then fix, parity, validate

How the model is prepared: ``torch.export`` (non-strict; the batch dimension dynamic where the model allows it, every
other shape fixed at the example inputs, so Python control flow on shapes works where torch.fx cannot trace it),
then torchao's ``prepare_pt2e`` (PTQ: eval-mode graph, batch norm folded into the convolutions at prepare) or
``prepare_qat_pt2e`` (QAT: Conv+BN kept with live statistics) with :class:`~tiexport.quantization.pt2e.TIDLQuantizer`
(the FX path's qconfig types, observers, fake-quant and graph rules). The fake-quants are named after what they
quantize (:func:`~tiexport.quantization.pt2e.name_fake_quants`), so the ONNX Q/DQ nodes are too.

Shared with the FX wrappers (:class:`~tiexport.wrappers.base.QuantWrapper`): the epoch counting, batch-norm and
observer freezing (here by setting the graph's batch-norm ops' ``training`` argument: ops captured by torch.export do
not follow ``module.train()``), ``eval()``, bias calibration (on the ATen graph's conv/linear calls), DDP statistics
sync, and ``export()`` (export, fix, parity, validate; the dynamo exporter by default). Differences: PTQ folds batch
norm at prepare, so ``num_batch_norm_update_epochs`` has nothing to update there; cross-layer equalization (default
on for ``WT8SYMP2_AT8SYMP2``) is computed on a torch.fx trace of the BN-folded float model, so it needs a model
torch.fx can trace (others go on without it, logged); a QAT model with Conv+BN
exports its ``convert_pt2e`` form (batch norm folded), made on a copy, with parity checked against that copy.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule

from tiexport import compat
from tiexport.errors import UsageError, first_line
from tiexport.quantization.attention import swap_attention_modules, traceable_sdpa
from tiexport.quantization.bias_calibration import BiasCalibrator
from tiexport.quantization.equalization import EqualizationReport, equalize_cross_layer
from tiexport.quantization.qconfig import QCONFIG_TYPES, QConfigLike
from tiexport.wrappers.base import QuantOptions, QuantWrapper, check_qat_epochs

__all__ = ["PTQPT2EModule", "QATPT2EModule"]

log = logging.getLogger(__name__)


def _resolve_type(qconfig_type: QConfigLike | None, device: str | None) -> QConfigLike:
    """The named type to use: as given, else the device's (:func:`~tiexport.quantization.pt2e.qconfig_type_for_device`),
    else ``WC8_AT8``."""
    if qconfig_type is not None:
        return qconfig_type
    return _pt2e().qconfig_type_for_device(device) if device is not None else "WC8_AT8"


def _pt2e() -> Any:
    try:
        from tiexport.quantization import pt2e
    except ImportError as exc:
        raise UsageError(f"{compat.TORCHAO_HINT} ({first_line(exc)})") from exc
    return pt2e


class _PT2EBiasCalibrator(BiasCalibrator):
    """Looks up the PT2E bias calibrator lazily: the base class attribute needs a class at import time, and
    ``tiexport.quantization.pt2e`` imports torchao."""

    def __new__(cls, graph_module: GraphModule, factor: float, *, fixed_reference: bool = False) -> Any:
        return _pt2e().PT2EBiasCalibrator(graph_module, factor, fixed_reference=fixed_reference)


def _following_batch_norm(folded: GraphModule, model: torch.nn.Module,
                          conv_name: str) -> torch.nn.modules.batchnorm._BatchNorm | None:
    """The batch norm that followed ``conv_name`` in ``model`` before torch.fx's ``fuse`` folded it away."""
    traced = torch.fx.symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_module" and str(node.target) == conv_name and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module":
                m = model.get_submodule(str(user.target))
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    return m
    return None


class _QuantPT2EModule(QuantWrapper):
    """The PT2E side of PTQPT2EModule and QATPT2EModule; see the module docstring."""

    _bias_calibrator_class = _PT2EBiasCalibrator
    _default_exporter = "dynamo"

    def __init__(self, model: torch.nn.Module, options: QuantOptions, example_inputs: Any = None,
                 device: str | None = None, quantizer: Any = None) -> None:
        pt2e = _pt2e()
        if quantizer is None:
            if not isinstance(options.qconfig_type, str):
                raise UsageError("the PT2E wrappers take a qconfig type name, or a torchao Quantizer as quantizer=")
            quantizer = pt2e.TIDLQuantizer(options.qconfig_type, device,
                                           range_shrink_percentile=options.range_shrink_percentile)
        elif not isinstance(quantizer, compat.torchao_pt2e().Quantizer):
            raise UsageError(f"quantizer must be a torchao Quantizer, not {type(quantizer).__name__}")
        super().__init__(model, options, example_inputs)
        self.quantizer = quantizer
        name = getattr(quantizer, "qconfig_type", None)
        self.qconfig_type_name = name if isinstance(name, str) else "custom"
        cle = options.cross_layer_equalization
        if cle is None:  # as on the FX path: on for the per-tensor weight type (PTQ here)
            spec = QCONFIG_TYPES.get(self.qconfig_type_name)
            cle = spec is not None and not spec.weight_per_channel
        self.cross_layer_equalization = bool(cle)
        self.equalization: EqualizationReport | None = None
        self._prepare_now()

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pt2e = _pt2e()
        model = self.module
        swap_attention_modules(model)
        model.train(self._is_qat)  # PTQ: eval graph (batch norm folded at prepare); QAT: Conv+BN with statistics
        # F.scaled_dot_product_attention stays one opaque ATen op in torch.export: the quantizer would leave the
        # attention between its inputs and output float (TIDL014 errors on its MatMuls); written out, it is
        # MatMul -> Softmax -> MatMul with Q/DQ, as the FX path traces it (also in equalization's torch.fx trace)
        with traceable_sdpa(model, args, kwargs):
            if self.cross_layer_equalization:
                model = self._equalized(model)
            try:
                exported = compat.export_for_quantization(model, args, kwargs)
            except Exception as exc:
                raise UsageError(f"torch.export cannot capture {type(model).__name__}: {first_line(exc)}") from exc
        try:
            prepared = compat.pt2e_prepare(exported, self.quantizer, qat=self._is_qat)
        except AssertionError as exc:  # torchao states what it cannot prepare with bare asserts
            raise UsageError(f"torchao cannot prepare {type(model).__name__}: "
                             f"{first_line(exc, default='an internal assertion failed')}") from exc
        pt2e.plain_train_eval(prepared)
        pt2e.name_fake_quants(prepared)
        pt2e.init_weight_fake_quants(prepared)
        setattr(prepared, "_tiexport_qconfig_type", self.qconfig_type_name)  # noqa: B010  export writes it
        n_fq = len({id(m) for m in prepared.modules() if isinstance(m, FakeQuantizeBase)})
        rules = getattr(self.quantizer, "rules", {}) or {}
        log.info("%s prepared %s with %s: %d fake-quant modules, %d made symmetric by graph rules",
                 type(self).__name__, type(model).__name__, self.qconfig_type_name, n_fq,
                 sum(len(v) for v in rules.values()))
        self._finish_prepare(prepared)

    def _equalized(self, model: torch.nn.Module) -> torch.nn.Module:
        """Cross-layer equalization (:mod:`tiexport.quantization.equalization`, as on the FX path) computed on a
        torch.fx trace of the float model with batch norm folded into the convolutions. PTQ quantizes that folded
        model (prepare_pt2e would fold it the same way); QAT keeps its batch norms and gets the same per-channel
        factors on the model itself: a layer's outputs through its batch norm's affine parameters (or its weight
        and bias), the next layer's inputs through its weight. A model torch.fx cannot trace goes on without it."""
        from torch.fx.experimental.optimization import fuse

        spec = QCONFIG_TYPES.get(self.qconfig_type_name)
        was_training = model.training
        try:
            with compat.quiet_torch():
                folded = cast(GraphModule, fuse(model.eval(), inplace=False))
        except Exception as exc:  # torch.fx cannot trace it: the PT2E path goes on without equalization
            log.info("cross-layer equalization skipped: torch.fx cannot trace %s (%s)", type(model).__name__,
                     first_line(exc))
            model.train(was_training)
            return model
        model.train(was_training)
        modules = dict(folded.named_modules())
        before = {name: m.weight.detach().clone() for name, m in modules.items() if hasattr(m, "weight")
                  and isinstance(getattr(m, "weight", None), torch.Tensor)}
        self.equalization = equalize_cross_layer(
            folded, power_of_2_grid=127.0 if spec is not None and spec.weight_power_of_2 else None,
            headroom=0.95 if self._is_qat else 1.0)
        if not self._is_qat:
            return folded
        originals = dict(model.named_modules())
        with torch.no_grad():
            for a_name, b_name in self.equalization.pairs:
                a_w, a_before = modules[a_name].weight.detach(), before[a_name]
                # A's output channels were scaled by f: read f off its weight rows (exactly one factor per row)
                rows = a_before.flatten(1).abs().sum(1)
                f = torch.where(rows > 0, a_w.flatten(1).abs().sum(1) / rows.clamp_min(1e-30), torch.ones_like(rows))
                a, b = originals[a_name], originals[b_name]
                bn = _following_batch_norm(folded, model, a_name)
                if bn is not None:
                    bn.weight.mul_(f.to(bn.weight))
                    bn.bias.mul_(f.to(bn.bias))
                else:
                    a.weight.mul_(f.reshape(-1, *([1] * (a.weight.dim() - 1))).to(a.weight))
                    if getattr(a, "bias", None) is not None:
                        a.bias.mul_(f.to(a.bias))
                inv = (1.0 / f).to(b.weight)
                depthwise = isinstance(b, torch.nn.Conv2d) and b.groups == b.in_channels == b.out_channels > 1
                shape = (-1, *([1] * (b.weight.dim() - 1))) if depthwise else (1, -1, *([1] * (b.weight.dim() - 2)))
                b.weight.mul_(inv.reshape(shape))
        return model

    def _apply_freeze_state(self) -> None:
        super()._apply_freeze_state()
        if self._prepared and not self._converted:
            _pt2e().set_graph_modes(cast(GraphModule, self.module),
                                    batch_norm_training=self.training and not self._bn_frozen,
                                    dropout_training=self.training and self._is_qat)

    def convert(self) -> _QuantPT2EModule:
        """``convert_pt2e``: every fake-quant becomes ``quantize_per_tensor -> dequantize_per_tensor`` and every
        weight an int8 constant behind a dequantize (QAT Conv+BN folded). Returns ``self`` (as TI's ``convert``);
        ``.module`` is the converted GraphModule, which exports to the same QDQ ONNX."""
        if not self._prepared:
            raise UsageError("convert() needs a prepared model: pass example_inputs or run a forward pass first")
        if self._converted:
            return self
        self.eval()
        self.module = self._converted_copy(in_place=True)
        self._converted = True
        self._bias_calibrator = None
        log.info("converted with convert_pt2e")
        return self

    def _converted_copy(self, in_place: bool = False) -> GraphModule:
        pt2e = _pt2e()
        module = cast(GraphModule, self.module if in_place else copy.deepcopy(self.module))
        pt2e.set_graph_modes(module, batch_norm_training=False, dropout_training=False)
        converted = compat.pt2e_convert(module)
        pt2e.plain_train_eval(converted)
        converted.train(False)
        setattr(converted, "_tiexport_qconfig_type", self.qconfig_type_name)  # noqa: B010
        return cast(GraphModule, converted)

    def _export_module(self) -> torch.nn.Module:
        if self._is_qat and not self._converted and _pt2e().has_batch_norm(cast(GraphModule, self.module)):
            # the prepared QAT graph computes Conv+BN as conv(W * gamma/std) / (gamma/std) + b, then batch norm;
            # convert_pt2e folds it to one conv, which is what TIDL takes
            log.info("exporting the convert_pt2e form of a copy (Conv+BN folded); parity is checked against it")
            return self._converted_copy()
        return self.module


class PTQPT2EModule(_QuantPT2EModule):
    """Post-training quantization on the PT2E path (TI v3's name): training-mode forwards without backward
    calibrate observers (and biases). Arguments as :class:`~tiexport.wrappers.fx.PTCFxModule`, plus ``device``
    (picks the qconfig type when ``qconfig_type=None``) and ``quantizer`` (a torchao Quantizer of your own instead
    of :class:`~tiexport.quantization.pt2e.TIDLQuantizer`)."""

    _is_qat = False

    def __init__(
        self,
        model: torch.nn.Module,
        qconfig_type: QConfigLike | None = None,
        example_inputs: Any = None,
        bias_calibration_factor: float = 0.01,
        num_batch_norm_update_epochs: int | None = None,
        num_observer_update_epochs: int | None = None,
        total_epochs: int = 2,
        range_shrink_percentile: float | None = None,
        cross_layer_equalization: bool | None = None,
        *,
        device: str | None = None,
        quantizer: Any = None,
    ) -> None:
        super().__init__(model, QuantOptions(
            qconfig_type=_resolve_type(qconfig_type, device), bias_calibration_factor=bias_calibration_factor,
            num_batch_norm_update_epochs=num_batch_norm_update_epochs,
            num_observer_update_epochs=num_observer_update_epochs, total_epochs=total_epochs,
            range_shrink_percentile=range_shrink_percentile, cross_layer_equalization=cross_layer_equalization,
        ), example_inputs, device=device, quantizer=quantizer)


class QATPT2EModule(_QuantPT2EModule):
    """Quantization-aware training on the PT2E path (TI v3's name). ``total_epochs`` is required and > 0; other
    arguments as :class:`~tiexport.wrappers.fx.QATFxModule`, plus ``device`` and ``quantizer`` as for
    :class:`PTQPT2EModule`."""

    _is_qat = True

    def __init__(
        self,
        model: torch.nn.Module,
        total_epochs: int | None = None,
        qconfig_type: QConfigLike | None = None,
        example_inputs: Any = None,
        bias_calibration_factor: float = 0.0,
        num_batch_norm_update_epochs: int | None = None,
        num_observer_update_epochs: int | None = None,
        range_shrink_percentile: float | None = None,
        cross_layer_equalization: bool | None = None,
        *,
        device: str | None = None,
        quantizer: Any = None,
    ) -> None:
        total_epochs = check_qat_epochs(total_epochs, "QATPT2EModule", "PTQPT2EModule")
        super().__init__(model, QuantOptions(
            qconfig_type=_resolve_type(qconfig_type, device), bias_calibration_factor=bias_calibration_factor,
            num_batch_norm_update_epochs=num_batch_norm_update_epochs,
            num_observer_update_epochs=num_observer_update_epochs, total_epochs=total_epochs,
            range_shrink_percentile=range_shrink_percentile, cross_layer_equalization=cross_layer_equalization,
        ), example_inputs, device=device, quantizer=quantizer)
