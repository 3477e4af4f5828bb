"""Every torch-version-specific detail in one place: exporter entry points, where torch keeps its TorchScript
symbolic registry and ``torch.ao`` quantization classes (and which classes are quantized or reference modules),
version checks, and :func:`module_device`, the one torch helper the ONNX side needs (parity against a module).

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "DYNAMO_MIN_OPSET",
    "TORCHSCRIPT_MAX_OPSET",
    "ao_classes",
    "ao_quantization",
    "export_dynamo",
    "export_torchscript",
    "get_ts_custom_symbolic",
    "has_dynamo_exporter",
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
    torchao = torchao_classes()  # a model prepared by torchao's own observers (PT2E with another quantizer)
    return {
        "fake_quant": _get(ao, "FakeQuantizeBase") + torchao[:1],
        "observer": _get(ao, "ObserverBase") + torchao[1:],
        "conv_bn_qat": conv_bn,
        "conv_bn_relu_qat": _get(nniqat, "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d"),
        "quant_stub": _get(ao, "QuantStub"),
        "dequant_stub": _get(ao, "DeQuantStub"),
    }


def module_device(module: Any) -> Any:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


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


# ------------------------------------------------------------------------------------------------- torchao PT2E
# torch's own PT2E quantization (torch.ao.quantization.quantizer, quantize_pt2e) left torch for torchao; tiexport's
# PT2E path (tiexport.quantization.pt2e, tiexport.wrappers.pt2e) reaches torchao only through the functions below.
# Tested with torchao 0.18.0 on torch 2.13 (CPU).

TORCHAO_HINT = "the PT2E path needs torchao >= 0.18 (pip install 'tiexport[pt2e]')"


@lru_cache(maxsize=1)
def torchao_pt2e() -> Any:
    """A namespace of the torchao PT2E objects tiexport uses: ``Quantizer``, ``QuantizationSpec``,
    ``SharedQuantizationSpec``, ``QuantizationAnnotation``, ``prepare_pt2e``, ``prepare_qat_pt2e``, ``convert_pt2e``,
    ``FakeQuantizeBase``, ``ObserverBase``, ``Q_ANNOTATION_KEY``, ``with_args`` (torchao's ``_with_args``: prepare
    reads the class of a constructor only from torchao's own ``PartialWrapper``). ImportError with an install hint."""
    import types

    # torchao logs a WARNING per optional CUDA kernel library it cannot load on a CPU machine, and torch's pytree
    # one for an Enum it registers; neither is anything a user of the CPU PT2E flow can act on
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with quiet_torch():
            quantize_pt2e = importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
            quantizer = importlib.import_module("torchao.quantization.pt2e.quantizer")
            quantizer_mod = importlib.import_module("torchao.quantization.pt2e.quantizer.quantizer")
            pt2e = importlib.import_module("torchao.quantization.pt2e")
            observer = importlib.import_module("torchao.quantization.pt2e.observer")
    except ImportError as exc:
        raise ImportError(f"{TORCHAO_HINT}: {exc}") from exc
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return types.SimpleNamespace(
        Quantizer=quantizer.Quantizer,
        QuantizationSpec=quantizer.QuantizationSpec,
        SharedQuantizationSpec=quantizer.SharedQuantizationSpec,
        QuantizationAnnotation=quantizer.QuantizationAnnotation,
        Q_ANNOTATION_KEY=quantizer_mod.Q_ANNOTATION_KEY,
        prepare_pt2e=quantize_pt2e.prepare_pt2e,
        prepare_qat_pt2e=quantize_pt2e.prepare_qat_pt2e,
        convert_pt2e=quantize_pt2e.convert_pt2e,
        FakeQuantizeBase=pt2e.FakeQuantizeBase,
        ObserverBase=pt2e.ObserverBase,
        with_args=observer._with_args,  # torchao's prepare recognizes only its own PartialWrapper
        version=getattr(importlib.import_module("torchao"), "__version__", "?"),
    )


def has_torchao() -> bool:
    """torchao's PT2E API is importable."""
    try:
        torchao_pt2e()
    except ImportError:
        return False
    return True


def torchao_classes() -> tuple[type, ...]:
    """torchao's own observer and fake-quant base classes, when torchao is already imported (a model prepared by
    torchao's PT2E flow has them); ``()`` otherwise: nothing here imports torchao for a model that cannot hold them."""
    import sys

    if "torchao.quantization.pt2e" not in sys.modules:
        return ()
    ns = torchao_pt2e()
    return (ns.FakeQuantizeBase, ns.ObserverBase)


def export_for_quantization(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.export`` a float model to the ATen-level GraphModule that PT2E quantization annotates (non-strict).

    The batch dimension (dim 0 of every tensor input) is ``Dim.AUTO``: dynamic where the model allows it, so that
    calibration and training run on any batch size, static where the model specializes on it; every other dimension
    is static, so Python control flow on shapes is evaluated at the example inputs."""
    import torch

    def batch_dynamic(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: torch.export.Dim.AUTO} if value.dim() > 0 else None
        return None

    def two(value: Any) -> Any:  # a batch of 1 would specialize the batch dimension to 1 (0/1 specialization)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
            return torch.cat([value, value])
        return value

    traced_args, traced_kwargs = tuple(two(a) for a in args), {k: two(v) for k, v in kwargs.items()}
    dynamic = ([batch_dynamic(a) for a in args] if not kwargs else
               {**{f"_arg{i}": batch_dynamic(a) for i, a in enumerate(args)},
                **{k: batch_dynamic(v) for k, v in kwargs.items()}})
    with quiet_torch():
        try:
            program = torch.export.export(model, traced_args, traced_kwargs or None, strict=False,
                                          dynamic_shapes=tuple(dynamic) if isinstance(dynamic, list) else dynamic)
        except Exception:  # e.g. a batch-size assertion Dim.AUTO cannot express: retry static
            program = torch.export.export(model, tuple(args), dict(kwargs) or None, strict=False)
    return program.module()


def allow_train_eval(model: Any) -> None:
    """Let ``train()``/``eval()`` work on a torch.export GraphModule (torchao replaces them by errors, or by
    ``move_exported_model_to_train/eval`` once allowed: batch norm and dropout ops switch with the mode)."""
    importlib.import_module("torchao.quantization.pt2e").allow_exported_model_train_eval(model)


def move_exported_model(model: Any, training: bool) -> None:
    """Switch the ops of a torch.export GraphModule between training and eval behaviour (batch norm, dropout):
    ``model.train()``/``eval()`` do not reach ops captured in the graph."""
    pt2e = importlib.import_module("torchao.quantization.pt2e")
    if training:
        pt2e.move_exported_model_to_train(model)
    else:
        pt2e.move_exported_model_to_eval(model)


# torchao's QAT Conv+BN fusion (prepare_qat_pt2e) and folding (convert_pt2e) trace each of their ~24 pattern
# functions with a strict torch.export on every call, 96 traces per convert_pt2e of a QAT model: 15-30 s on a CPU,
# whatever the model's size. The traced pattern depends only on the pattern function (code and closure), the shapes
# and dtypes of the example inputs and the keyword arguments, so tiexport traces each once per process and hands out
# copies. torchao 0.18: qat_utils imports _get_aten_graph_module_for_pattern by name; the patch is in place only
# for the duration of tiexport's own prepare/convert calls.
_PATTERN_CACHE: dict[Any, Any] = {}


def _pattern_key(pattern: Any, example_inputs: Any, is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    import torch

    def part(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, (tuple, list)):
            return tuple(part(v) for v in value)
        hash(value)
        return value

    fn = getattr(pattern, "fn", pattern)  # torchao wraps each pattern function in a fresh WrapperModule
    cells = tuple(part(c.cell_contents) for c in (getattr(fn, "__closure__", None) or ()))
    return (getattr(fn, "__code__", fn), cells, part(tuple(example_inputs)), is_cuda,
            tuple(sorted((k, part(v)) for k, v in kwargs.items())))


@contextlib.contextmanager
def _cached_pt2e_patterns() -> Iterator[None]:
    import copy

    try:
        qat_utils = importlib.import_module("torchao.quantization.pt2e.qat_utils")
    except ImportError:  # pragma: no cover - another torchao layout: no cache
        yield
        return
    original = getattr(qat_utils, "_get_aten_graph_module_for_pattern", None)
    if original is None:  # pragma: no cover
        yield
        return

    def cached(pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any) -> Any:
        try:
            key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        except TypeError:  # something unhashable: trace as torchao would
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_CACHE[key])

    setattr(qat_utils, "_get_aten_graph_module_for_pattern", cached)  # noqa: B010
    try:
        yield
    finally:
        setattr(qat_utils, "_get_aten_graph_module_for_pattern", original)  # noqa: B010


def pt2e_prepare(model: Any, quantizer: Any, qat: bool) -> Any:
    """torchao's ``prepare_qat_pt2e`` (``qat``) or ``prepare_pt2e``, with the QAT patterns traced once per process."""
    ns = torchao_pt2e()
    with quiet_torch(), _cached_pt2e_patterns():
        return (ns.prepare_qat_pt2e if qat else ns.prepare_pt2e)(model, quantizer)


def pt2e_convert(model: Any) -> Any:
    """torchao's ``convert_pt2e`` (Q/DQ form, weights folded to int8 constants), with the QAT Conv+BN folding
    patterns traced once per process."""
    with quiet_torch(), _cached_pt2e_patterns():
        return torchao_pt2e().convert_pt2e(model)
