"""Every torch-version-specific detail in one place: exporter entry points, where torch keeps its TorchScript
symbolic registry and ``torch.ao`` quantization classes, and version checks.

Tested with torch 2.13 (TorchScript exporter deprecated but present; the dynamo exporter, built on onnxscript, is
torch's default). The package accepts ``torch>=2.3``; where an older torch keeps a thing elsewhere, the lookup below
tries both places. Nothing here imports torch at module level: ``import tiexport.compat`` is free.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "DYNAMO_MIN_OPSET",
    "TORCHSCRIPT_MAX_OPSET",
    "ao_classes",
    "ao_quantization",
    "conv_bn_folding",
    "export_dynamo",
    "export_torchscript",
    "get_ts_custom_symbolic",
    "has_dynamo_exporter",
    "install_conv_bn_forward",
    "module_device",
    "quiet_torch",
    "restore_ts_custom_symbolic",
    "set_ts_custom_symbolic",
    "torch_version",
    "torchscript_max_opset",
    "ts_parse_arg",
]

log = logging.getLogger(__name__)

# Highest opset the TorchScript exporter has symbolics for (torch 2.1 .. 2.13: 20; torchscript_max_opset() asks torch).
TORCHSCRIPT_MAX_OPSET = 20
# The dynamo exporter builds at opset 18 or newer; lower targets are converted afterwards (torch does the same).
DYNAMO_MIN_OPSET = 18


@lru_cache(maxsize=1)
def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    import torch

    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def torchscript_max_opset() -> int:
    """The highest opset the installed torch's TorchScript exporter supports."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", TORCHSCRIPT_MAX_OPSET))
    except ImportError:  # pragma: no cover - layout of another torch
        return TORCHSCRIPT_MAX_OPSET


def has_dynamo_exporter() -> bool:
    """torch.onnx.export(..., dynamo=True) with ``custom_translation_table`` exists (the torch.export-based exporter
    of torch >= 2.6, per torch's ONNX docs) and onnxscript is importable."""
    if torch_version() < (2, 6):
        return False
    try:
        importlib.import_module("onnxscript")
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation chatter (torch.ao, TorchScript exporter) and the dynamo exporter's progress
    prints; tiexport reports what matters itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Setting ONNX exporter to use operator set version.*")
        warnings.filterwarnings("ignore", message=".*lifted.*constant.*")
        warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", module=r"onnxscript.*")
        yield


# ---------------------------------------------------------------------------------------------------- torch.ao


@lru_cache(maxsize=1)
def ao_quantization() -> Any:
    """``torch.ao.quantization`` (deprecated upstream in favour of torchao, still shipped in 2.13)."""
    with quiet_torch():
        return importlib.import_module("torch.ao.quantization")


@lru_cache(maxsize=1)
def ao_classes() -> dict[str, Any]:
    """The torch.ao classes tiexport dispatches on, by role. Missing ones (older/newer torch) map to ``()``."""
    ao = ao_quantization()
    with quiet_torch():
        import torch.ao.nn.intrinsic.qat as nniqat

    def _get(mod: Any, *names: str) -> tuple[type, ...]:
        return tuple(getattr(mod, n) for n in names if hasattr(mod, n))

    conv_bn = _get(importlib.import_module("torch.ao.nn.intrinsic.qat.modules.conv_fused"), "_ConvBnNd")
    return {
        "fake_quant": _get(ao, "FakeQuantizeBase"),
        "observer": _get(ao, "ObserverBase"),
        "conv_bn_qat": conv_bn,
        "conv_bn_relu_qat": _get(nniqat, "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d"),
        "quant_stub": _get(ao, "QuantStub"),
        "dequant_stub": _get(ao, "DeQuantStub"),
    }


def install_conv_bn_forward(module: Any) -> int:
    """Give every torch.ao QAT Conv+BN module in ``module`` a cheaper forward of the same function.

    torch's ``_ConvBnNd._forward_approximate`` runs ``bn(conv(x, fq(W * f)) / f + b_c)`` with ``f = g/std`` per
    output channel: the division and the bias add are passes over the whole activation, forward and backward
    (``DivBackward`` alone was 12 % of a ResNet-20 QAT step on CPU, bench/RESULTS.md, QAT section). Installed per
    instance on ``_forward_approximate``:

    - batch norm updating (training-mode statistics): ``bn(conv(x, fq(W * f) / f, b_c))``. Convolution is linear
      in its weight per output channel, so dividing the fake-quantized weight by ``f`` is the same function as
      dividing the output, on a tensor the size of the weight; the conv adds ``b_c`` itself. Gradients reach
      ``W``, ``g`` and ``b_c`` through the same expressions (equal up to float rounding, a test holds it).
    - batch norm frozen (running statistics): ``conv(x, fq(W * f), (b_c - mean) * f + beta)``, torch's own
      "Z_inference" formula and what the exported ONNX (and TIDL) computes.

    Falls back to torch's method where it would not apply (no running statistics, a batch norm without affine
    weight). Returns how many modules it set.
    """
    conv_bn = ao_classes()["conv_bn_qat"]
    count = 0
    for m in module.modules():
        if conv_bn and isinstance(m, conv_bn) and callable(getattr(type(m), "_forward_approximate", None)):
            m._forward_approximate = types.MethodType(_conv_bn_forward, m)
            count += 1
    return count


def conv_bn_folding(m: Any) -> tuple[Any, Any]:
    """``(factor, bias)`` of a QAT Conv+BN module with running statistics: the folded weight is ``weight * factor``
    per output channel (``gamma / std``, the expression torch's ``_forward_approximate`` fake-quantizes) and the
    folded bias ``beta + (b_c - mean) * factor``. One definition for the frozen forward below and the export's
    folding (tiexport.symbolics.lowering), so that both fake-quantize the same values and add the same bias."""
    import torch

    bn = m.bn
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    conv_bias = m.bias if m.bias is not None else torch.zeros_like(std)
    return factor, beta + (conv_bias - bn.running_mean) * factor


def module_device(module: Any) -> Any:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _conv_bn_forward(self: Any, x: Any) -> Any:
    import torch

    bn = self.bn
    if bn.running_var is None or bn.running_mean is None or bn.weight is None:
        return type(self)._forward_approximate(self, x)
    if bn.training:
        factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape([-1] + [1] * (self.weight.dim() - 1))
        weight = self.weight_fake_quant(self.weight * factor) / factor
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bn(self._conv_forward(x, weight.to(x.dtype), bias))
    factor, bias = conv_bn_folding(self)
    weight = self.weight_fake_quant(_folded_weight(self, factor))
    return self._conv_forward(x, weight, bias.to(x.dtype))


def _folded_weight(m: Any, factor: Any) -> Any:
    """``m.weight * factor`` per output channel; without autograd, the same tensor object as long as the weight,
    gamma, running variance and eps are unchanged (:func:`reuse_result`), so that the weight fake-quant can reuse
    its output (``TidlFakeQuantize``: PTC calibration and evaluation quantize each weight once)."""
    import torch

    shape = [-1] + [1] * (m.weight.dim() - 1)
    sources = (m.weight, m.bn.weight, m.bn.running_var)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
        m.__dict__.pop("_folded_weight_cache", None)
        return m.weight * factor.reshape(shape)
    return reuse_result(m, "_folded_weight_cache", sources, float(m.bn.eps), lambda: m.weight * factor.reshape(shape))


def _contents(tensors: tuple[Any, ...]) -> tuple[Any, ...]:
    # version counter, storage address, dtype, device, shape: assigning ``.data`` (what Module.to/.double/.cuda do
    # to parameters) keeps the object and its version counter but not the storage
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)


def reuse_result(owner: Any, slot: str, sources: tuple[Any, ...], extra: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, or the tensor it returned last time (kept in ``owner.__dict__[slot]``) if every tensor in
    ``sources`` is the same object with the same contents, ``extra`` is equal, and that result was not modified in
    place since. Contents are judged by version counter (moved by every in-place write), storage address, dtype,
    device and shape; the entry holds detached aliases of the sources, so a replaced storage cannot come back at
    the old address. ``compute`` may write the sources (an observer updating its buffers): the entry records their
    state after it. Inference-mode tensors keep no version counter: no reuse, nothing kept."""
    try:
        state = _contents(sources)
    except RuntimeError:
        owner.__dict__.pop(slot, None)
        return compute()
    hit = owner.__dict__.get(slot)
    if (hit is not None and hit[1] == state and hit[2] == extra
            and all(a is b for a, b in zip(hit[0], sources, strict=True)) and hit[4]._version == hit[5]):
        return hit[4]
    out = compute()
    try:
        aliases = tuple(t.detach() for t in sources if t is not None)
        owner.__dict__[slot] = (sources, _contents(sources), extra, aliases, out, out._version)
    except RuntimeError:  # an inference-mode result keeps no version counter
        owner.__dict__.pop(slot, None)
    return out


# Packages whose modules compute on quantized tensors (after ``convert``/``convert_fx``) and those of torch's
# "reference" quantized modules (after ``convert_to_reference_fx``), by module path prefix: the classes moved between
# torch.nn.quantized and torch.ao.nn.quantized over the 1.x/2.x releases.
QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized.modules", "torch.ao.nn.intrinsic.quantized.modules",
                             "torch.nn.quantized.modules", "torch.nn.intrinsic.quantized.modules",
                             "torch.ao.nn.quantized.dynamic", "torch.ao.nn.quantizable")
REFERENCE_MODULE_PREFIXES = ("torch.ao.nn.quantized.reference", "torch.nn.quantized._reference")


def module_kind(module: Any) -> str:
    """'reference', 'quantized' or 'float' by where the module's class lives."""
    path = type(module).__module__
    if path.startswith(REFERENCE_MODULE_PREFIXES):
        return "reference"
    if path.startswith(QUANTIZED_MODULE_PREFIXES):
        return "quantized"
    return "float"


def convert_observed(model: Any, is_fx: bool) -> Any:
    """Convert a calibrated (observed, not yet converted) torch.ao model: ``convert_fx`` for FX models, ``convert``
    for eager ones. The caller passes a copy."""
    with quiet_torch():
        if is_fx:
            from torch.ao.quantization.quantize_fx import convert_fx

            return convert_fx(model)
        return ao_quantization().convert(model, inplace=False)


# ---------------------------------------------------------------------------------------------- TorchScript side


@lru_cache(maxsize=1)
def _ts_registry() -> Any:
    """torch's TorchScript symbolic registry (moved to ``torchscript_exporter`` in torch 2.9)."""
    for name in ("torch.onnx._internal.torchscript_exporter.registration", "torch.onnx._internal.registration"):
        try:
            return importlib.import_module(name).registry
        except (ImportError, AttributeError):
            continue
    raise RuntimeError("this torch has no TorchScript ONNX symbolic registry")


def get_ts_custom_symbolic(name: str, opset: int) -> Callable[..., Any] | None:
    """The custom symbolic a user registered for ``name`` at exactly ``opset`` (torch.onnx.register_custom_op_symbolic),
    or None. Reads torch's registry privately: torch has no public getter."""
    group = _ts_registry().get_function_group(name)
    if group is None:
        return None
    functions = group._functions
    if not functions.overridden(opset):
        return None
    return functions._overrides.get(opset)


def set_ts_custom_symbolic(name: str, fn: Callable[..., Any], opset: int) -> None:
    import torch

    torch.onnx.register_custom_op_symbolic(name, fn, opset)


def restore_ts_custom_symbolic(name: str, opset: int, previous: Callable[..., Any] | None) -> None:
    """Put back what was registered before (a user's symbolic) or remove ours."""
    import torch

    if previous is not None:
        torch.onnx.register_custom_op_symbolic(name, previous, opset)
    elif get_ts_custom_symbolic(name, opset) is not None:
        torch.onnx.unregister_custom_op_symbolic(name, opset)


def ts_parse_arg(value: Any, desc: str) -> Any:
    """Read a constant argument inside a TorchScript symbolic ('f', 'i', 's', 'fs', 'is')."""
    from torch.onnx import symbolic_helper

    parse: Any = symbolic_helper._parse_arg
    return parse(value, desc)


def export_torchscript(model: Any, args: tuple[Any, ...], opset: int, input_names: Sequence[str],
                       output_names: Sequence[str], custom_opsets: dict[str, int]) -> bytes:
    """Run the TorchScript exporter (static shapes, eval mode, constant folding) and return the serialized model."""
    import torch

    buf = io.BytesIO()
    export: Any = torch.onnx.export  # the TorchScript path takes a file object; the stubs say path only
    with quiet_torch():
        export(
            model, args, buf, dynamo=False, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
            custom_opsets=custom_opsets, dynamic_axes=None, verbose=False,
        )
    return buf.getvalue()


def export_dynamo(model: Any, args: tuple[Any, ...], opset: int, input_names: Sequence[str],
                  output_names: Sequence[str], table: dict[Any, Any]) -> Any:
    """Run the dynamo exporter (torch.export + onnxscript translation, static shapes) and return the ModelProto.

    Builds at ``max(opset, 18)``: the caller converts down afterwards, once tiexport's marker nodes are replaced.
    """
    import torch

    with quiet_torch(), _quiet_stdout():
        program = torch.onnx.export(
            model, args, dynamo=True, opset_version=max(opset, DYNAMO_MIN_OPSET), input_names=list(input_names),
            output_names=list(output_names), custom_translation_table=table, dynamic_shapes=None,
            optimize=True, verify=False, report=False, external_data=False, verbose=False,
        )
    if program is None:  # pragma: no cover - only when f= is passed
        raise RuntimeError("the dynamo exporter returned no program")
    return program.model_proto


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """The dynamo exporter prints progress lines ('[torch.onnx] Obtain model graph...') even with verbose=False in
    some releases; keep library output clean unless TIEXPORT_DEBUG is set."""
    if os.environ.get("TIEXPORT_DEBUG"):
        yield
        return
    # torch.onnx logs optional-dependency notes (torchvision ops skipped) at WARNING on every dynamo export
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        onnx_log.setLevel(level)
