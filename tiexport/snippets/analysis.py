"""What the snippets are derived from: :func:`analyze_model` reads a model's format (QDQ, TIDL QAT v1, float),
scales, weights and inputs; :func:`scale_type` and :func:`benchmark_function` turn that into TIDL's
``quantization_scale_type`` and edgeai-benchmark's runtime-options method (see :mod:`tiexport.snippets`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto

from tiexport.context import ModelContext, dtype_name
from tiexport.devices import DeviceProfile, get_device
from tiexport.errors import UsageError
from tiexport.onnx_io import as_model
from tiexport.tidl_spec import PASS_THROUGH, is_power_of_two

__all__ = [
    "BENCHMARK_QAT_V1_FUNCTION",
    "FORMAT_FLOAT",
    "FORMAT_QAT_V1",
    "FORMAT_QDQ",
    "SCALE_TYPE_NP2_PERCHAN",
    "SCALE_TYPE_P2",
    "InputInfo",
    "ModelAnalysis",
    "analyze_context",
    "analyze_model",
    "benchmark_function",
    "scale_type",
]

SCALE_TYPE_P2 = 1
SCALE_TYPE_NP2_PERCHAN = 4
_BENCHMARK_FUNCTION = {
    SCALE_TYPE_P2: "runtime_options_onnx_qat_v2_p2",
    SCALE_TYPE_NP2_PERCHAN: "runtime_options_onnx_qat_v2",
}
BENCHMARK_QAT_V1_FUNCTION = "runtime_options_onnx_qat_v1"
FORMAT_QDQ, FORMAT_QAT_V1, FORMAT_FLOAT = "qdq", "qat_v1", "float"


@dataclass(frozen=True)
class InputInfo:
    """One graph input: name, shape (ints, symbols or None), element type, and how the model quantizes it."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: str
    quant_dtype: str | None = None
    """Integer type of the first QuantizeLinear reading this input (None: not quantized)."""
    quant_range: tuple[float, float] | None = None
    """Float range that QuantizeLinear represents: ``scale * (qmin - zp) .. scale * (qmax - zp)``."""

    @property
    def channels(self) -> int | None:
        """C of an NCHW input, when the input is 4-D with a known channel count."""
        if self.shape is not None and len(self.shape) == 4 and isinstance(self.shape[1], int) and self.shape[1] > 0:
            return self.shape[1]
        return None

    @property
    def hw(self) -> tuple[int, int] | None:
        """(H, W) of an NCHW input with known spatial dims."""
        if self.shape is None or len(self.shape) != 4:
            return None
        h, w = self.shape[2], self.shape[3]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
        return None


@dataclass(frozen=True)
class ModelAnalysis:
    """What the snippets need to know about a QDQ model, read from its Q/DQ nodes and inputs."""

    name: str
    quantized: bool
    """The model has QuantizeLinear/DequantizeLinear nodes."""
    format: str
    """``qdq`` (Q/DQ nodes: ``prequantized_model: 1``), ``qat_v1`` (TI's legacy QAT: a float graph whose ranges are
    power-of-2 Clip nodes) or ``float``."""
    power_of_two: bool
    """Every Q/DQ scale (weights, activations, int32 bias) is an exact power of two."""
    per_channel_weights: bool
    """Some weight DequantizeLinear (not an int32 bias) has more than one scale."""
    symmetric: bool
    """Every Q/DQ zero point is 0 (TIDL's sense of symmetric, tidl.md §2)."""
    symmetric_weights: bool
    """Every weight zero point is 0."""
    qdq_nodes: int
    inputs: tuple[InputInfo, ...] = field(default_factory=tuple)
    qat_v1_clips: int = 0
    """Clip nodes at power-of-2 ranges of a QAT v1 model."""

    def describe(self) -> str:
        """One line for snippet headers."""
        if self.format == FORMAT_QAT_V1:
            return f"TIDL QAT v1 model ({self.qat_v1_clips} Clip nodes at power-of-2 ranges, no Q/DQ nodes)"
        if not self.quantized:
            return "float model (no Q/DQ nodes)"
        return (f"{'power-of-2' if self.power_of_two else 'non-power-of-2'} scales, "
                f"{'per-channel' if self.per_channel_weights else 'per-tensor'} weights, "
                f"{'symmetric' if self.symmetric else 'asymmetric'} zero points "
                f"({self.qdq_nodes} Q/DQ nodes)")


def analyze_context(ctx: ModelContext) -> ModelAnalysis:
    """:func:`analyze_model` of a model already indexed (``snippet`` validates it first, with the same context)."""
    all_p2 = True
    per_channel = False
    symmetric = True
    symmetric_w = True
    count = 0
    for node in ctx.qdq_nodes():
        count += 1
        qp = ctx.qparams(node)
        if qp is None:  # non-constant qparams: validate reports them (TIDL011); nothing to read here
            continue
        if qp.scale.size and not bool(np.all(is_power_of_two(qp.scale))):
            all_p2 = False
        is_weight = ctx.is_weight_dq(node)
        if not qp.symmetric:
            symmetric = False
            if is_weight:
                symmetric_w = False
        # int32 bias DQ scales follow the weight's channels; they are not a per-channel *weight* (as in TIDL022)
        if is_weight and qp.per_channel and qp.qtype != TensorProto.INT32:
            per_channel = True
    inputs = tuple(_input_info(ctx, vi.name) for vi in ctx.graph_inputs)
    quantized = ctx.is_quantized
    v1 = len(ctx.qat_v1_clips)
    return ModelAnalysis(
        name=ctx.name,
        quantized=quantized,
        format=FORMAT_QDQ if quantized else FORMAT_QAT_V1 if v1 else FORMAT_FLOAT,
        qat_v1_clips=v1,
        power_of_two=quantized and all_p2,
        per_channel_weights=per_channel,
        symmetric=symmetric,
        symmetric_weights=symmetric_w,
        qdq_nodes=count,
        inputs=inputs,
    )


def _input_info(ctx: ModelContext, name: str) -> InputInfo:
    elem = ctx.elem_type(name)
    q_dtype: str | None = None
    q_range: tuple[float, float] | None = None
    # the same search as rule TIDL023: through Cast and the ops quantization passes through
    quantizers = list(ctx.input_quantizers(name, PASS_THROUGH | {"Cast"}))
    if quantizers:
        qp = ctx.qparams(quantizers[0])
        if qp is not None:
            q_dtype = dtype_name(qp.qtype)
            if qp.qrange is not None and qp.scale.size == 1:
                s = float(np.asarray(qp.scale, dtype=np.float64).ravel()[0])
                zp = int(qp.zero_points.ravel()[0])
                q_range = (s * (qp.qrange[0] - zp), s * (qp.qrange[1] - zp))
    return InputInfo(name=name, shape=ctx.shape(name), dtype=dtype_name(elem) if elem else "unknown",
                     quant_dtype=q_dtype, quant_range=q_range)


def analyze_model(model: Any) -> ModelAnalysis:
    """Read the facts the snippets depend on from a model (ModelProto, path, bytes or LoadedModel).

    Power-of-2 uses the same test as rule TIDL020 (:func:`tiexport.tidl_spec.is_power_of_two`);
    per-channel weights the same test as TIDL022; the input quantizer the same search as TIDL023.
    """
    return analyze_context(ModelContext(as_model(model)))


def scale_type(analysis: ModelAnalysis, device: str | DeviceProfile) -> int:
    """``advanced_options:quantization_scale_type`` for this model on this device (tidl.md §4).

    The device decides: 1 (power-of-2) on TDA4VM, 4 (non-power-of-2, per-channel) on the MMAv2 devices, for QDQ and
    QAT v1 models alike. edgeai-benchmark applies its device preset after a YAML config's own options in every
    release (r9.2 ``interfaces/get_configs_from_file.py`` L76-82, r11.2 L103-108) and after a Python entry's function
    in 11.x (r11.2 ``core/runtime_options.py`` L171-178), so this is what TI's tools compile with whatever a config
    asks; every snippet format states the same value. Raises UsageError for a float model.
    """
    dev = get_device(device)  # an unknown device is a usage error whatever the model
    if analysis.format != FORMAT_QAT_V1 and not analysis.quantized:
        raise UsageError(f"{analysis.name}: float model, no prequantized scale type applies")
    return SCALE_TYPE_NP2_PERCHAN if dev.per_channel_weights else SCALE_TYPE_P2


def benchmark_function(scale: int, fmt: str = FORMAT_QDQ) -> str:
    """The edgeai-benchmark settings method that sets this scale type for a QDQ (or QAT v1) model (tidl.md §5)."""
    return BENCHMARK_QAT_V1_FUNCTION if fmt == FORMAT_QAT_V1 else _BENCHMARK_FUNCTION[scale]
