"""Make any torch.ao-quantized model exportable: every quantization site becomes one ``tiexport::quantize_dequantize``
call with frozen parameters, named after its module.

What :class:`ExportLowering` does on entry, and undoes on exit (the user's model is left as it was found):

- every module's ``training`` flag is set to False directly (not via ``eval()``, whose overrides in wrappers may count
  epochs or freeze things); the flags are restored one by one afterwards;
- **fake-quant modules** (any ``torch.ao`` ``FakeQuantizeBase`` subclass: FakeQuantize, FusedMovingAvgObsFakeQuantize,
  FixedQParams..., learnable ones, user subclasses): observers are disabled (``observer_enabled``/learning flags
  saved and restored) and ``forward`` is patched, on the instance, to call the custom op with the module's
  ``scale``/``zero_point``/``quant_min``/``quant_max``/``qscheme``/``ch_axis``. A disabled fake-quant
  (``fake_quant_enabled == 0``) exports as identity, with a warning;
- **QAT conv-bn modules** (``torch.ao.nn.intrinsic.qat`` ConvBn/ConvBnReLU): BatchNorm folded into the conv weight
  and bias (the same ``w * gamma / std`` the module fake-quantizes in eval), so the export is Conv (+Relu), not
  Conv/Div/Add/BatchNormalization;
- **calibrated but unconverted models** (observers, no fake-quant): converted on a copy (``convert_fx``/``convert``);
- **converted models** (``convert_fx`` or eager ``convert``: quantized tensors, ``torch.ops.quantized.*``, quantized
  modules) and **reference models** (``convert_to_reference_fx``): one probe run on the example inputs records the
  quantization parameters of every quantized tensor; then FX graphs are rewritten (a new GraphModule sharing the
  user's float modules; the original is untouched) and eager models get their quantized modules swapped (restored on
  exit) for float computations with Q/DQ sites: ``quantize_per_tensor -> Q/DQ``, ``dequantize -> nothing``, a
  quantized conv/linear -> ``DQ(int8 weight)`` + float op + ``Q/DQ`` of its output, ``quantized.add/cat/matmul/...``
  -> float op + ``Q/DQ``, and a float op on quantized tensors (pooling, resize, ...) -> the op + ``Q/DQ`` with the
  same parameters (what TIDL needs around those layers, tidl.md §2), except pure view ops (reshape, flatten, ...).

Site names (the ``module`` of each Q/DQ, see ``tiexport.symbolics.export``): a fake-quant module's qualified name;
in converted models ``<module>`` for a lowered quantized module's output, ``<module>.weight`` for its weight, and the
FX node's name for functional ops (``add_relu``, ``quantize_per_tensor``...).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tiexport import compat
from tiexport.errors import UsageError
from tiexport.quantization.conv_bn import conv_bn_folding
from tiexport.symbolics.converted import VIEW_MODULES, graph_is_quantized, lower_converted_graph
from tiexport.symbolics.modules import LoweredFunctional, Requant, lower_quantized_module
from tiexport.symbolics.ops import QSpec, qdq
from tiexport.symbolics.pt2e import is_pt2e_converted, lower_pt2e_graph
from tiexport.symbolics.specs import spec_from_fake_quant, spec_from_qtensor

__all__ = ["ExportLowering"]

log = logging.getLogger(__name__)


@dataclass
class _State:
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list)
    forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    temp_buffers: list[tuple[nn.Module, str]] = field(default_factory=list)
    swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)


_MISSING = object()


class ExportLowering:
    """``with ExportLowering(model, args) as export_model:`` — see the module docstring. ``warnings`` collects
    user-facing notes (restricted ranges, disabled fake-quants, conversions made); ``sites`` counts what was done."""

    def __init__(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        self.model = model
        self.args = args
        self.warnings: list[str] = []
        self.fake_quant_sites: dict[str, QSpec | None] = {}
        self.kind = "float"
        self._state = _State()

    # -- entry / exit ------------------------------------------------------------------------------------------------
    def __enter__(self) -> nn.Module:
        try:
            return self._enter()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _enter(self) -> nn.Module:
        model = self.model
        classes = compat.ao_classes()
        fq_types, obs_types = classes["fake_quant"], classes["observer"]
        self._set_eval(model)
        if is_pt2e_converted(model):  # convert_pt2e's quantized_decomposed Q/DQ (tiexport.symbolics.pt2e)
            self.kind = "converted"
            return lower_pt2e_graph(model)
        fake_quants = [(n, m) for n, m in model.named_modules() if fq_types and isinstance(m, fq_types)]
        fq_children = {id(c) for _, fq in fake_quants for c in fq.modules()}
        observers = [n for n, m in model.named_modules()
                     if obs_types and isinstance(m, obs_types) and id(m) not in fq_children]
        converted = self._is_converted(model)
        if observers and not fake_quants and not converted:
            model = self._convert_observed(model, observers)
            converted = True
        if fake_quants:
            self.kind = "fake_quant"
            self._patch_fake_quants(fake_quants)
            self._fold_conv_bn(model, classes)
        if converted:
            self.kind = "converted" if not fake_quants else "mixed"
            model = self._lower_converted(model)
        if self.kind == "float":
            self.warnings.append("the model has no fake-quant, observer or quantized module: exported as a float "
                                 "model, which TIDL would calibrate itself (prequantized_model: 1 has nothing to read)")
        return model

    def _set_eval(self, model: nn.Module) -> None:
        for m in model.modules():
            self._state.modes.append((m, m.training))
            m.training = False

    def _restore(self) -> None:
        st = self._state
        for parent, attr, original in reversed(st.swaps):
            setattr(parent, attr, original)
        for m, fwd in reversed(st.forwards):
            if fwd is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd
        for m, name in reversed(st.temp_buffers):
            m._buffers.pop(name, None)
        for m, name, value in reversed(st.buffers):
            getattr(m, name).copy_(value)
        for m, mode in reversed(st.modes):
            m.training = mode
        self._state = _State()

    # -- fake-quant models --------------------------------------------------------------------------------------------
    def _patch_fake_quants(self, fake_quants: list[tuple[str, Any]]) -> None:
        restricted: dict[tuple[int, int], list[str]] = defaultdict(list)
        disabled: list[str] = []
        never_observed: list[str] = []
        for name, fq in fake_quants:
            for flag in ("observer_enabled", "fake_quant_enabled", "learning_enabled", "static_enabled"):
                buf = getattr(fq, flag, None)
                if isinstance(buf, torch.Tensor):
                    self._state.buffers.append((fq, flag, buf.detach().clone()))
            if hasattr(fq, "disable_observer"):
                fq.disable_observer()
            for flag in ("observer_enabled", "learning_enabled", "static_enabled"):
                buf = getattr(fq, flag, None)  # set directly too: a subclass may not route these through methods
                if isinstance(buf, torch.Tensor):
                    buf.fill_(0)
            spec = spec_from_fake_quant(fq, name)
            self.fake_quant_sites[name] = spec
            if spec is None:
                disabled.append(name)
            else:
                if not spec.full_range:
                    restricted[(spec.quant_min, spec.quant_max)].append(name)
                obs = getattr(fq, "activation_post_process", None)
                min_val = getattr(obs, "min_val", None)
                if isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or bool(torch.isinf(min_val).all())):
                    never_observed.append(name)
            self._patch_forward(fq, _fake_quant_forward(spec, name))
        for (lo, hi), sites in sorted(restricted.items()):
            bits = max(1, math.ceil(math.log2(hi - lo + 1)))
            self.warnings.append(
                f"{len(sites)} fake-quant site(s) use the restricted integer range [{lo}, {hi}] ({bits}-bit: "
                f"{_few(sites)}): exported as 8-bit Q/DQ with that range enforced (weights stored within it, "
                "activations clipped), but TIDL's prequantized import takes 8-bit only and reads the full "
                "int8/uint8 range (tidl.md §2); TIDL will not reproduce the narrower quantization")
        if disabled:
            self.warnings.append(f"{len(disabled)} fake-quant module(s) have fake-quant disabled and export without "
                                 f"Q/DQ: {_few(disabled)}")
        if never_observed:
            self.warnings.append(f"{len(never_observed)} fake-quant module(s) never observed data (calibrate or "
                                 f"train first); exported with their initial scale: {_few(never_observed)}")

    def _patch_forward(self, m: nn.Module, fwd: Callable[..., Any]) -> None:
        self._state.forwards.append((m, m.__dict__.get("forward", _MISSING)))
        m.forward = fwd

    def _fold_conv_bn(self, model: nn.Module, classes: dict[str, Any]) -> None:
        conv_bn, conv_bn_relu = classes["conv_bn_qat"], classes["conv_bn_relu_qat"]
        if not conv_bn:
            return
        for name, m in model.named_modules():
            if not isinstance(m, conv_bn):
                continue
            bn = m.bn
            if bn.running_var is None or bn.running_mean is None:
                continue  # no running statistics to fold: keep the module's own forward
            with torch.no_grad():
                factor, bias = conv_bn_folding(m)
                weight = m.weight * factor.reshape([-1] + [1] * (m.weight.dim() - 1))
            for buf_name, value in (("folded_weight", weight), ("folded_bias", bias)):
                if hasattr(m, buf_name):
                    raise UsageError(f"{name}: {type(m).__name__} already has an attribute {buf_name!r}")
                m.register_buffer(buf_name, value.detach().clone())
                self._state.temp_buffers.append((m, buf_name))
            self._patch_forward(m, _conv_bn_forward(m, isinstance(m, conv_bn_relu) if conv_bn_relu else False))

    # -- converted / observed models ---------------------------------------------------------------------------------
    @staticmethod
    def _is_converted(model: nn.Module) -> bool:
        for m in model.modules():
            if compat.module_kind(m) != "float":
                return True
            if isinstance(m, torch.fx.GraphModule) and graph_is_quantized(m):
                return True
        return False

    def _convert_observed(self, model: nn.Module, observers: list[str]) -> nn.Module:
        is_fx = any(isinstance(m, torch.fx.GraphModule) for m in model.modules())
        try:
            converted = compat.convert_observed(copy.deepcopy(model), is_fx)
        except Exception as exc:
            raise UsageError(f"the model has observers ({_few(observers)}) but no fake-quant: it is calibrated, not "
                             f"converted, and converting a copy failed ({type(exc).__name__}: {exc}); call "
                             "convert_fx()/convert() yourself and export the result") from exc
        self.warnings.append(f"the model is calibrated but not converted ({len(observers)} observers): exported "
                             f"the result of {'convert_fx' if is_fx else 'convert'} on a copy")
        self._set_eval(converted)
        return converted

    def _lower_converted(self, model: nn.Module) -> nn.Module:
        graphs = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, torch.fx.GraphModule) and graph_is_quantized(m)]
        top = [(n, m) for n, m in graphs if not any(n != o and (o == "" or n.startswith(o + ".")) for o, _ in graphs)]
        captured: dict[str, tuple[Any, ...]] = {}
        eager_specs: dict[str, list[QSpec | None]] = defaultdict(list)
        func_specs: dict[str, dict[str, QSpec]] = defaultdict(dict)
        hooks = []
        inside_graph = {id(s) for _, g in top for s in g.modules()}
        for name, gm in top:
            hooks.append(gm.register_forward_pre_hook(_capture(captured, name)))
        restores: list[tuple[nn.Module, str]] = []
        # children of a quantized module (nnq.Linear's packed params) are its internals, not separate layers
        internals = {id(c) for m in model.modules() if compat.module_kind(m) != "float"
                     for c in m.modules() if c is not m}
        for name, m in model.named_modules():
            if id(m) in inside_graph or id(m) in internals or m is model:
                continue
            if type(m).__name__ == "QFunctional":
                for op in ("add", "add_relu", "mul", "mul_relu", "add_scalar", "mul_scalar", "cat", "matmul"):
                    if hasattr(m, op):
                        setattr(m, op, _record_method(getattr(m, op), func_specs[name], op, name))
                        restores.append((m, op))
            elif compat.module_kind(m) != "float" or not list(m.children()):
                hooks.append(m.register_forward_hook(_record_output(eager_specs, name)))
        try:
            with torch.no_grad(), compat.quiet_torch():
                model(*self.args)
        finally:
            for h in hooks:
                h.remove()
            for m, op in restores:
                m.__dict__.pop(op, None)
        for name, gm in top:
            if name not in captured:
                raise UsageError(f"the converted FX graph {name or '<root>'} did not run on the example inputs")
            lowered = lower_converted_graph(gm, captured[name], prefix=name)
            if name == "":
                return lowered
            self._swap(model, name, lowered)
        for name, m in list(model.named_modules()):
            if id(m) in inside_graph or id(m) in internals or name == "":
                continue
            if type(m).__name__ == "QFunctional":
                self._swap(model, name, LoweredFunctional(func_specs.get(name, {}), name))
                continue
            specs = eager_specs.get(name)
            if specs is None:
                continue
            distinct = {s for s in specs}
            if len(distinct) > 1:
                raise UsageError(f"module {name!r} runs more than once with different quantization; give each use "
                                 "its own module")
            spec = next(iter(distinct)) if distinct else None
            kind = compat.module_kind(m)
            if kind != "float":
                self._swap(model, name, lower_quantized_module(m, name, spec))
            elif spec is not None and not isinstance(m, VIEW_MODULES):
                self._swap(model, name, Requant(m, spec, name))
        return model

    def _swap(self, model: nn.Module, name: str, new: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        self._state.swaps.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)


def _fake_quant_forward(spec: QSpec | None, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if spec is None:
        return lambda x: x

    def forward(x: torch.Tensor) -> torch.Tensor:
        return qdq(x, spec, name)

    return forward


def _conv_bn_forward(m: Any, relu: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = m.weight_fake_quant(m.folded_weight)
        y = m._conv_forward(x, w, m.folded_bias)
        return F.relu(y) if relu else y

    return forward


def _capture(store: dict[str, tuple[Any, ...]], name: str) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        store.setdefault(name, args)

    return hook


def _record_output(store: dict[str, list[QSpec | None]], name: str) -> Callable[..., None]:
    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            store[name].append(spec_from_qtensor(out, name) if out.is_quantized else None)

    return hook


def _record_method(fn: Callable[..., Any], store: dict[str, QSpec], op: str, name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_quantized:
            store[op] = spec_from_qtensor(out, f"{name}.{op}")
        return out

    return wrapper


def _few(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


