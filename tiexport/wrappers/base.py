"""What every PTC/QAT wrapper shares: its options, the epoch state machine, DDP sync, forward, export.

A wrapper owns a model being quantized (``.module``) and follows TI's training loop (shared wrapper reference, "API
users already write"): every ``train()`` call is one epoch; batch-norm statistics freeze after
``num_batch_norm_update_epochs`` and observers after ``num_observer_update_epochs`` (TI's defaults when not given:
``total_epochs // 2 - 1`` and ``total_epochs // 2 + 1``; an explicit 0 means frozen from the start, where TI takes it
for "the default"); ``eval()`` freezes both. PTC runs its training-mode forwards under ``torch.no_grad()`` with
dropout in eval mode; bias calibration, when on, corrects biases once batch norm is frozen. ``export()`` runs
:func:`tiexport.workflows.export.export_checked` (export, fix, parity, validate).

How the model is prepared (torch.fx today; torch.export for the PT2E path) and converted is the subclass's:
:meth:`QuantWrapper._prepare` and :meth:`QuantWrapper.convert`.

Distributed data parallel: batch-norm running statistics are averaged across ranks before every training forward
while they update (and once after they freeze), so BN-folded weights and their scales agree on every rank.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule

from tiexport.errors import UsageError
from tiexport.quantization.bias_calibration import BiasCalibrator
from tiexport.quantization.qconfig import QConfigLike, qconfig_type_name
from tiexport.workflows.export import QuantExportResult, export_checked

__all__ = ["QuantOptions", "QuantWrapper", "positional_inputs", "split_inputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantOptions:
    """A wrapper's settings, checked once; the wrappers' constructors take them as TI's keyword arguments."""

    qconfig_type: QConfigLike = "WC8_AT8"
    backend: str = "qnnpack"
    bias_calibration_factor: float = 0.0
    num_batch_norm_update_epochs: int | None = None
    num_observer_update_epochs: int | None = None
    total_epochs: int = 2
    range_shrink_percentile: float | None = None
    cross_layer_equalization: bool | None = None

    def __post_init__(self) -> None:
        total = self.total_epochs
        if total is None or isinstance(total, bool) or not isinstance(total, int):
            raise UsageError(f"total_epochs must be an int, got {total!r}")
        if total < 0:
            raise UsageError(f"total_epochs must be >= 0, got {total}")
        for name in ("num_batch_norm_update_epochs", "num_observer_update_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UsageError(f"{name} must be an int >= 0 or None, got {value!r}")
        factor = self.bias_calibration_factor
        if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
            raise UsageError(f"bias_calibration_factor must be a finite number >= 0, got {factor!r}")
        cle = self.cross_layer_equalization
        if cle is not None and not isinstance(cle, bool):
            raise UsageError(f"cross_layer_equalization must be True, False or None, got {cle!r}")

    @property
    def batch_norm_update_epochs(self) -> int:
        """Epochs batch-norm statistics update for: as given (0: frozen from the start), else TI's default."""
        n = self.num_batch_norm_update_epochs
        return max(self.total_epochs // 2 - 1, 0) if n is None else n

    @property
    def observer_update_epochs(self) -> int:
        """Epochs observers update for: as given (0: frozen from the start), else TI's default."""
        n = self.num_observer_update_epochs
        return max(self.total_epochs // 2 + 1, 0) if n is None else n


def check_qat_epochs(total_epochs: int | None, wrapper: str, calibration_wrapper: str) -> int:
    """``total_epochs`` of a QAT wrapper, which must be > 0: it sets when batch norm and observers freeze (other
    types are QuantOptions' to refuse)."""
    if total_epochs is None or (isinstance(total_epochs, int) and not isinstance(total_epochs, bool)
                                and total_epochs <= 0):
        raise UsageError(
            f"{wrapper} needs total_epochs > 0 (got {total_epochs!r}): it sets when batch norm and observers "
            f"freeze; for calibration without training use {calibration_wrapper}"
        )
    return total_epochs


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor -> one positional argument; a tuple/list -> positional arguments; a dict -> keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise UsageError(
        f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
        f"not {type(example_inputs).__name__}"
    )


def positional_inputs(module: torch.nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], list[str] | None]:
    """Positional arguments for export, and the input names when they came as a dict of keyword arguments.

    ONNX inputs are positional; a dict is put in ``forward``'s parameter order and its keys become the input names.
    """
    args, kwargs = split_inputs(example_inputs)
    if not kwargs:
        return args, None
    if args:
        raise UsageError("pass example_inputs either as a tuple of arguments or as a dict of keyword arguments")
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - {p.name for p in params})
    if unknown:
        raise UsageError(f"example_inputs has keys that forward() does not take: {', '.join(unknown)}")
    ordered = [p for p in params if p.name in kwargs]
    skipped = [p.name for p in params[: len(ordered)] if p.name not in kwargs]
    if skipped:
        raise UsageError(f"example_inputs misses {', '.join(skipped)}: ONNX inputs are positional")
    return tuple(kwargs[p.name] for p in ordered), [p.name for p in ordered]


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


class QuantWrapper(torch.nn.Module):
    """Shared machinery of the PTC/QAT wrappers; see the module docstring. Subclasses implement :meth:`_prepare`
    and :meth:`convert`."""

    _is_qat: bool = False
    #: the bias calibration that fits the subclass's graph (torch.fx modules; PT2E: ATen calls)
    _bias_calibrator_class: type[BiasCalibrator] = BiasCalibrator
    #: ``export()``'s exporter when none is given
    _default_exporter: str = "torchscript"

    def __init__(self, model: torch.nn.Module, options: QuantOptions, example_inputs: Any = None) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if isinstance(model, QuantWrapper):
            raise UsageError("model is already wrapped; pass the float model")
        self.options = options
        self.qconfig_type_name = qconfig_type_name(options.qconfig_type)
        self.backend = options.backend
        self.total_epochs = options.total_epochs
        self.num_batch_norm_update_epochs = options.batch_norm_update_epochs
        self.num_observer_update_epochs = options.observer_update_epochs
        self.bias_calibration_factor = float(options.bias_calibration_factor)
        self.num_epochs_tracked = 0
        self._bn_frozen = self.num_batch_norm_update_epochs == 0
        self._observers_frozen = self.num_observer_update_epochs == 0
        self._bn_sync_pending = False
        self._converted = False
        self._bias_calibrator: BiasCalibrator | None = None
        self._example_inputs: Any = example_inputs
        self.module: torch.nn.Module = model
        self._prepared = False

    def _prepare_now(self) -> None:
        """Prepare at construction when example inputs were given (subclasses call it last in ``__init__``)."""
        if self._example_inputs is not None:
            args, kwargs = split_inputs(self._example_inputs)
            self._prepare(args, kwargs)

    # --- preparation and conversion: the subclass's ------------------------------------------------------------
    @property
    def is_prepared(self) -> bool:
        return self._prepared

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def convert(self) -> QuantWrapper:
        raise NotImplementedError

    def _finish_prepare(self, prepared: GraphModule) -> None:
        """Install a prepared module (a GraphModule, from torch.fx or torch.export): bias calibration, training mode
        and the current freeze state."""
        self.module = prepared
        self._prepared = True
        if self.bias_calibration_factor > 0:
            self._bias_calibrator = self._bias_calibrator_class(prepared, self.bias_calibration_factor,
                                                                fixed_reference=not self._is_qat)
        self.module.train(self.training)
        self._apply_freeze_state()

    # --- epochs and freezing -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> QuantWrapper:
        super().train(mode)
        if mode:
            epoch = self.num_epochs_tracked
            bn_frozen = epoch >= self.num_batch_norm_update_epochs
            observers_frozen = epoch >= self.num_observer_update_epochs
            if bn_frozen and not self._bn_frozen_logged:
                log.info("epoch %d: batch-norm statistics frozen from now on", epoch)
                self._bn_frozen_logged = True
            if observers_frozen and not self._observers_frozen_logged:
                log.info("epoch %d: observers (quantization ranges) frozen from now on", epoch)
                self._observers_frozen_logged = True
            self._bn_frozen, self._observers_frozen = bn_frozen, observers_frozen
            self.num_epochs_tracked += 1
            self._bn_sync_pending = True
            if self._is_qat and self.total_epochs and self.num_epochs_tracked > self.total_epochs:
                log.warning("epoch %d of total_epochs=%d", self.num_epochs_tracked, self.total_epochs)
        else:
            self._bn_frozen = self._observers_frozen = True
        if self._bias_calibrator is not None:
            self._bias_calibrator.apply_pending()
        self._apply_freeze_state()
        return self

    _bn_frozen_logged = False
    _observers_frozen_logged = False

    def _apply_freeze_state(self) -> None:
        if not self._prepared or self._converted:
            return
        for m in self.module.modules():
            if isinstance(m, FakeQuantizeBase):
                if self._observers_frozen:
                    m.disable_observer()
                else:
                    m.enable_observer()
            if hasattr(m, "freeze_bn_stats") and hasattr(m, "update_bn_stats"):  # torch.ao.nn.intrinsic.qat Conv+BN
                if self._bn_frozen:
                    cast(Any, m).freeze_bn_stats()
                else:
                    cast(Any, m).update_bn_stats()
        for m in self.module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train(self.training and not self._bn_frozen)
            if not self._is_qat and isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.train(False)  # calibration sees the deterministic network

    def freeze(self, freeze_bn: bool = True, freeze_observers: bool = True) -> None:
        """Freeze (or unfreeze) batch-norm statistics and observers now, independent of the epoch count."""
        self._bn_frozen, self._observers_frozen = freeze_bn, freeze_observers
        self._apply_freeze_state()

    @property
    def bn_frozen(self) -> bool:
        return self._bn_frozen

    @property
    def observers_frozen(self) -> bool:
        return self._observers_frozen

    def _sync_batch_norm(self) -> None:
        world = _world_size()
        if world <= 1:
            return
        with torch.no_grad():
            for m in self.module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    for buf in (m.running_mean, m.running_var):
                        if buf is not None:
                            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
                            buf.div_(world)

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._prepared:
            if self._example_inputs is None:
                self._example_inputs = args[0] if len(args) == 1 and not kwargs else (args if args else dict(kwargs))
            self._prepare(args, kwargs)
        if self.training and not self._converted and (self._bn_sync_pending or not self._bn_frozen):
            # Conv+BN QAT modules fold the running statistics into the weight before its fake-quant: ranks must
            # agree on them at every step, or their weight scales differ
            self._bn_sync_pending = False
            self._sync_batch_norm()
        calibrate = (
            self.training and self._bias_calibrator is not None and self._bn_frozen and not self._converted
        )
        if calibrate:
            assert self._bias_calibrator is not None
            if self._is_qat:
                return self._bias_calibrator.step(lambda: self.module(*args, **kwargs))
            with torch.no_grad():
                return self._bias_calibrator.step(lambda: self.module(*args, **kwargs))
        if self.training and not self._is_qat:
            with torch.no_grad():
                return self.module(*args, **kwargs)
        return self.module(*args, **kwargs)

    # --- export ------------------------------------------------------------------------------------------------
    def export(
        self,
        example_inputs: Any = None,
        path: str | Path = "model.onnx",
        opset_version: int = 17,
        device: str | None = None,
        *,
        exporter: str | None = None,
        parity: bool = True,
        parity_inputs: Any = None,
        fix_options: dict[str, Any] | None = None,
        **export_kwargs: Any,
    ) -> QuantExportResult:
        """Export ``.module`` to QDQ ONNX at ``path``, fix it for ``device`` (if given), check parity, validate.

        ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments (defaults to
        the inputs the module was prepared with). With ``device``, the fix pipeline for that device rewrites
        ``path`` in place (the file this call just wrote, never a user's input). Parity compares ``.module`` (the
        fake-quant or converted torch model) with the written ONNX in ONNX Runtime on ``parity_inputs`` (anything
        :func:`tiexport.check_parity` takes; default: ``example_inputs``); when that fails for a module on a GPU,
        a CPU copy of the module is checked too (``parity_cpu``, and a note saying which side the difference is
        on: GPU float kernels round differently from ONNX Runtime's CPU ones). Validation runs for ``device``, or for
        every device when none is given. Other keyword arguments go to :func:`tiexport.export` (``input_names``,
        ``output_names``, ``metadata``).
        """
        if not self._prepared:
            raise UsageError("export() needs a prepared model: pass example_inputs or run a forward pass first")
        if example_inputs is None:
            example_inputs = self._example_inputs
        if example_inputs is None:
            raise UsageError("export() needs example_inputs")
        args, names = positional_inputs(self.module, example_inputs)
        if names is not None:
            export_kwargs.setdefault("input_names", names)
        self.eval()
        return export_checked(self._export_module(), args, path, opset_version=opset_version, device=device,
                              exporter=exporter or self._default_exporter, parity=parity,
                              parity_inputs=parity_inputs, fix_options=fix_options, **export_kwargs)

    def _export_module(self) -> torch.nn.Module:
        """The module ``export()`` exports and checks parity against (after ``eval()``): ``.module``."""
        return self.module

    def extra_repr(self) -> str:
        return (
            f"qconfig_type={self.qconfig_type_name}, total_epochs={self.total_epochs}, "
            f"epochs_tracked={self.num_epochs_tracked}, bn_frozen={self._bn_frozen}, "
            f"observers_frozen={self._observers_frozen}, converted={self._converted}"
        )
