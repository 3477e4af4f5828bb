"""PTCFxModule and QATFxModule: TI's FX wrapper API (edgeai-torchmodelopt v2), with its defects fixed.

The API users already write (shared wrapper reference, "API users already write")::

    model = PTCFxModule(model, qconfig_type="WC8_AT8", bias_calibration_factor=0.01)  # or QATFxModule(model, N)
    for epoch in range(n):
        model.train()                     # each train() call is one epoch
        for images, _ in loader:
            model(images)                 # QAT: loss, backward, optimizer step as usual
    model.eval()
    torch.save(model.module.state_dict(), "model.pth")
    model = model.convert()
    model.export(example_inputs, "model.onnx", opset_version=17, device="AM68A")

What differs from TI's implementation, on purpose:

- ``num_batch_norm_update_epochs=0`` / ``num_observer_update_epochs=0`` mean "frozen from the start" (TI treats an
  explicit 0 as "use the default"). Defaults when not given are TI's: ``total_epochs // 2 - 1`` and
  ``total_epochs // 2 + 1`` (at least 0).
- ``eval()`` freezes batch norm and observers and puts ``.module`` in eval mode; ``.module.eval()`` is plain torch
  eval (TI replaces the inner module's ``eval`` by ``train``).
- Range shrink is real (see :mod:`tiexport.quantization.observers`); bias calibration matches the float model's
  outputs (see :mod:`tiexport.quantization.bias_calibration`).
- Export accepts a tensor, a tuple or a dict of inputs and goes through :func:`tiexport.export`; it then fixes,
  checks parity against the fake-quant module and validates (see :meth:`export`).
- No deep copy of the original model is kept: the prepared GraphModule shares the model's parameters (torch.fx
  prepare works in place), so wrapping costs no second copy of the weights. Keep no reference to the original model:
  its submodules are the prepared module's now.
- Logging, no print. ``load_weights`` calls ``torch.load`` correctly and reports what did not load.

Both wrappers prepare with ``prepare_qat_fx`` (fake-quant modules, batch norm kept as fused Conv+BN QAT modules):
PTC is QAT without backward, so batch-norm re-estimation epochs work for PTC too. PTC runs its training-mode
forwards under ``torch.no_grad()`` and keeps dropout in eval mode, so calibration sees the deterministic network.

Distributed data parallel: prepare before wrapping in DDP (pass ``example_inputs``), and call ``train()``/``eval()``
on every rank. Activation observers reduce their statistics across ranks in every training forward and bias
corrections are averaged; batch-norm running statistics are averaged across ranks before every training forward
while they update (and once after they freeze), so the BN-folded weights and their scales agree too. Quantization
parameters are therefore identical on all ranks, with or without DDP's ``broadcast_buffers``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule

from tiexport.errors import UsageError, first_line
from tiexport.quantization.attention import swap_attention_modules, traceable_sdpa
from tiexport.quantization.conv_bn import init_weight_qparams, install_conv_bn_forward, swap_batch_norm_subclasses
from tiexport.quantization.coverage import unquantized_parts
from tiexport.quantization.equalization import EqualizationReport, equalize_cross_layer
from tiexport.quantization.qconfig import (
    QCONFIG_TYPES,
    QConfigLike,
    apply_graph_rules,
    get_backend_config,
    get_qconfig_mapping,
)
from tiexport.wrappers.base import QuantOptions, QuantWrapper, check_qat_epochs

__all__ = ["PTCFxModule", "QATFxModule"]

log = logging.getLogger(__name__)


@contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    # torch.ao.quantization's FX API warns that it is deprecated on every call; the wrapper is the supported path
    # here, and the warning is noise a user cannot act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        yield


@contextmanager
def _optional_arguments_as_defaults(model: torch.nn.Module, n_args: int, kwarg_names: list[str]) -> Iterator[None]:
    """While preparing: ``forward`` parameters the example inputs do not give are traced as their defaults.

    torch.fx makes every parameter of the root ``forward`` a placeholder, so an optional ``attn_mask=None`` or
    ``is_causal=False`` (timm's VisionTransformer) becomes a proxy: ``attn_mask is not None`` is then true and
    ``is_causal`` a tensor (``scaled_dot_product_attention(): argument 'is_causal' must be bool``). torch.ao's
    ``prepare_qat_fx`` takes no ``concrete_args``, so its tracer's ``trace`` gets them here."""
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    concrete: dict[str, Any] = {}
    positional = 0
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        given = p.name in kwarg_names or (p.kind != p.KEYWORD_ONLY and positional < n_args)
        if p.kind != p.KEYWORD_ONLY:
            positional += 1
        if not given and p.default is not p.empty:
            concrete[p.name] = p.default
    if not concrete:
        yield
        return
    original = QuantizationTracer.trace

    def trace(self: Any, root: Any, concrete_args: Any = None) -> Any:
        if root is model and concrete_args is None:
            concrete_args = concrete
        return original(self, root, concrete_args)

    QuantizationTracer.trace = trace  # type: ignore[method-assign]
    try:
        yield
    finally:
        QuantizationTracer.trace = original  # type: ignore[method-assign]


class _QuantFxModule(QuantWrapper):
    """The torch.fx side of PTCFxModule and QATFxModule: ``prepare_qat_fx`` with tiexport's qconfigs and graph
    rules, cross-layer equalization, the Conv+BN forward, and ``convert_to_reference_fx``."""

    def __init__(self, model: torch.nn.Module, options: QuantOptions, example_inputs: Any = None) -> None:
        super().__init__(model, options, example_inputs)
        qconfig_type = options.qconfig_type
        self._backend_config = get_backend_config(options.backend)
        self._qconfig_mapping = get_qconfig_mapping(qconfig_type,
                                                    range_shrink_percentile=options.range_shrink_percentile)
        self._apply_rules = isinstance(qconfig_type, str)
        self._align_add_inputs = self._apply_rules and QCONFIG_TYPES[self.qconfig_type_name].align_add_inputs
        self._matmul_same_sign = self._apply_rules and QCONFIG_TYPES[self.qconfig_type_name].matmul_same_sign
        cross_layer_equalization = options.cross_layer_equalization
        if cross_layer_equalization is None:
            # one weight scale per tensor: the case it is for (see tiexport.quantization.equalization)
            cross_layer_equalization = (self._apply_rules
                                        and not QCONFIG_TYPES[self.qconfig_type_name].weight_per_channel)
        self.cross_layer_equalization = cross_layer_equalization
        self.equalization: EqualizationReport | None = None
        self.unquantized: dict[str, str] = {}
        """Module name -> what stays unfolded or float there (warned about at wrap time)."""
        self._prepare_now()

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from torch.ao.quantization import quantize_fx

        model = self.module
        swap_attention_modules(model)
        swapped_bn, kept_bn = swap_batch_norm_subclasses(model)
        if swapped_bn:
            log.info("%d batch-norm subclass module(s) made plain batch norm + their activation, so they fold: %s",
                     len(swapped_bn), ", ".join(swapped_bn[:5]) + (" ..." if len(swapped_bn) > 5 else ""))
        try:
            with traceable_sdpa(model, args, kwargs), _quiet_torch_ao(), \
                    _optional_arguments_as_defaults(model, len(args), list(kwargs)):
                model.train()  # QAT fusion (Conv+BN kept as a QAT module) needs training mode
                prepared = quantize_fx.prepare_qat_fx(
                    model, self._qconfig_mapping, (*args, *kwargs.values()), backend_config=self._backend_config
                )
        except (torch.fx.proxy.TraceError, TypeError) as exc:
            # shape-driven control flow fails as a TypeError ("'Proxy' object cannot be interpreted as an integer")
            if isinstance(exc, TypeError) and "Proxy" not in str(exc):
                raise
            raise UsageError(
                f"torch.fx cannot trace {type(model).__name__} ({first_line(exc)}); make data-dependent control flow "
                "a leaf module or a concrete argument, or use the PT2E path (tiexport.PTQPT2EModule / "
                "QATPT2EModule), which traces with torch.export"
            ) from exc
        except AssertionError as exc:  # torch.ao states what it cannot fuse or prepare with bare asserts
            text = first_line(exc, default="an internal assertion failed")
            raise UsageError(f"torch.ao cannot prepare {type(model).__name__} for quantization: {text}") from exc
        self.unquantized = unquantized_parts(prepared)
        problems: dict[str, list[str]] = {name: [reason] for name, reason in kept_bn.items()}
        for name, reason in self.unquantized.items():
            problems.setdefault(name, []).append(reason)
        for name, reasons in problems.items():  # never a silent float island
            log.warning("%s: %s", name, "; ".join(reasons))
        changed = (
            apply_graph_rules(prepared, align_add_inputs=self._align_add_inputs,
                              matmul_same_sign=self._matmul_same_sign) if self._apply_rules else {}
        )
        if self.cross_layer_equalization:
            spec = QCONFIG_TYPES.get(self.qconfig_type_name)
            # QAT moves the weights: a largest weight placed exactly on the power-of-two grid would cross it with
            # the first update and double its layer's scale, so QAT keeps 5 % headroom (measured on the quality
            # bench: QAT 33.9 dB without, 34.8 with; PTC, whose weights stay put, is best without: 34.1 vs 32.3)
            self.equalization = equalize_cross_layer(
                prepared, power_of_2_grid=127.0 if spec is not None and spec.weight_power_of_2 else None,
                headroom=0.95 if self._is_qat else 1.0)
        install_conv_bn_forward(prepared)
        init_weight_qparams(prepared)
        setattr(prepared, "_tiexport_qconfig_type", self.qconfig_type_name)  # noqa: B010  export writes it to metadata
        n_fq = sum(1 for m in prepared.modules() if isinstance(m, FakeQuantizeBase))
        log.info(
            "%s prepared %s with %s: %d fake-quant modules, %d made symmetric by graph rules",
            type(self).__name__, type(model).__name__, self.qconfig_type_name, n_fq,
            sum(len(v) for v in changed.values()),
        )
        self._finish_prepare(prepared)

    def convert(self) -> _QuantFxModule:
        """Replace fake-quant by the reference quantized model: real integer tensors at every quantization point
        (``quantize_per_tensor`` / ``dequantize``), int8 weights, float reference kernels between. Returns ``self``
        (as TI's ``convert``); ``.module`` is the converted GraphModule. Exports to the same QDQ ONNX."""
        from torch.ao.quantization import quantize_fx

        if not self._prepared:
            raise UsageError("convert() needs a prepared model: pass example_inputs or run a forward pass first")
        if self._converted:
            return self
        self.eval()
        with _quiet_torch_ao():
            converted = quantize_fx.convert_to_reference_fx(
                cast(GraphModule, self.module), backend_config=self._backend_config
            )
        setattr(converted, "_tiexport_qconfig_type", self.qconfig_type_name)  # noqa: B010
        self.module = converted
        self._converted = True
        self._bias_calibrator = None
        log.info("converted to the reference quantized model")
        return self


class PTCFxModule(_QuantFxModule):
    """Post-training calibration: training-mode forwards (no backward) calibrate observers and biases.

    ``total_epochs`` defaults to 2 (TI's default): batch norm frozen from the start, observers updated for two
    epochs. ``bias_calibration_factor`` (TI recommends 0.001-0.01) is the step of the bias correction per batch.
    ``range_shrink_percentile`` overrides the percent of activation values clipped at each end (non-MSA types).
    ``cross_layer_equalization`` (a tiexport extension): rescale the channels of consecutive layers so that each
    channel's weights use the per-tensor range evenly, before calibration (the float function is unchanged; see
    :mod:`tiexport.quantization.equalization`). None (default): on for the per-tensor weight type
    WT8SYMP2_AT8SYMP2, off otherwise. What it did is in ``.equalization``.
    """

    _is_qat = False

    def __init__(
        self,
        model: torch.nn.Module,
        qconfig_type: QConfigLike = "WC8_AT8",
        backend: str = "qnnpack",
        example_inputs: Any = None,
        bias_calibration_factor: float = 0.01,
        num_batch_norm_update_epochs: int | None = None,
        num_observer_update_epochs: int | None = None,
        total_epochs: int = 2,
        range_shrink_percentile: float | None = None,
        cross_layer_equalization: bool | None = None,
    ) -> None:
        super().__init__(model, QuantOptions(
            qconfig_type=qconfig_type, backend=backend, bias_calibration_factor=bias_calibration_factor,
            num_batch_norm_update_epochs=num_batch_norm_update_epochs,
            num_observer_update_epochs=num_observer_update_epochs, total_epochs=total_epochs,
            range_shrink_percentile=range_shrink_percentile, cross_layer_equalization=cross_layer_equalization,
        ), example_inputs)


class QATFxModule(_QuantFxModule):
    """Quantization-aware training. ``total_epochs`` is required and > 0 (it sets the freezing defaults).

    TI's advice: about 10% of the float schedule with a learning rate about 1% of the float one.
    ``bias_calibration_factor`` defaults to 0 here: gradients train the biases. ``cross_layer_equalization``:
    as for :class:`PTCFxModule` (on by default for WT8SYMP2_AT8SYMP2: training starts from equalized weights).
    """

    _is_qat = True

    def __init__(
        self,
        model: torch.nn.Module,
        total_epochs: int | None = None,
        qconfig_type: QConfigLike = "WC8_AT8",
        backend: str = "qnnpack",
        example_inputs: Any = None,
        bias_calibration_factor: float = 0.0,
        num_batch_norm_update_epochs: int | None = None,
        num_observer_update_epochs: int | None = None,
        range_shrink_percentile: float | None = None,
        cross_layer_equalization: bool | None = None,
    ) -> None:
        total_epochs = check_qat_epochs(total_epochs, "QATFxModule", "PTCFxModule")
        super().__init__(model, QuantOptions(
            qconfig_type=qconfig_type, backend=backend, bias_calibration_factor=bias_calibration_factor,
            num_batch_norm_update_epochs=num_batch_norm_update_epochs,
            num_observer_update_epochs=num_observer_update_epochs, total_epochs=total_epochs,
            range_shrink_percentile=range_shrink_percentile, cross_layer_equalization=cross_layer_equalization,
        ), example_inputs)
