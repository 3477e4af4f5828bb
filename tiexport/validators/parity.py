"""Numeric parity against ONNX Runtime, per output and per layer, with errors in quantization steps (LSB).

``check_parity(reference, candidate)`` runs the same inputs through a reference (an ONNX model, or a torch module:
see :mod:`tiexport.validators.torch_parity`) and through the candidate ONNX model in ONNX Runtime, and compares
every output and, with ``per_layer=True``, every intermediate tensor the two share, in topological order. It
answers "which layer broke" (reference fact 6.4 of the shared TIDL notes: users cannot tell which layer of a QAT model
diverges in ONNX Runtime) by naming the first tensor that exceeds its tolerance.

Pass criterion, per compared tensor:

* ``atol`` and ``rtol`` both None (the default) and the tensor is quantized (it is produced by a DequantizeLinear,
  feeds a QuantizeLinear, holds the integer codes of a QuantizeLinear, or is a layout-only op such as Reshape of
  one of those): the absolute error, measured in steps of *that tensor's own* quantization (its scale, per channel
  where the scale is), is at most ``max_lsb`` steps on at least 99.9 % of its elements (``MIN_FRACTION``); a
  slack of 1e-3 step absorbs float32 rounding of dequantized values. The reference model's quantization is used,
  the candidate's where the reference has none (a float reference, or a torch module).
* otherwise (float tensors, or ``atol``/``rtol`` given): every element satisfies
  ``|candidate - reference| <= atol + rtol * |reference|``; defaults ``atol=1e-5``, ``rtol=1e-4``; when only one
  of the two is given the other is 0.

The report passes when every *output* passes; per-layer results are diagnostics (``first_divergence`` is the first
tensor in topological order that exceeds its tolerance, outputs included). Metrics per tensor: max and mean absolute
error, max relative error (over non-zero reference elements), max error in steps, share of elements within 1 step,
SQNR in dB, cosine similarity, and the smallest ``atol`` (with the given ``rtol``, else 0) and ``max_lsb`` that
would have passed.

ONNX Runtime runs with graph optimizations disabled (``ORT_DISABLE_ALL``) unless ``ort_optimizations=True``: TI
recommends that setting for QDQ models (shared TIDL notes §4), and it keeps every Q/DQ node as written, so the
numbers are those of the graph itself rather than of ORT's fused kernels.

This module never imports torch at module level: comparing two ONNX models works without torch installed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tiexport.errors import UnusableInputError, UsageError, first_line
from tiexport.onnx_io import LoadedModel, as_model, external_data_info
from tiexport.validators.context import ModelContext

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "LSB_SLACK",
    "MAX_RANDOM_ELEMENTS",
    "MIN_FRACTION",
    "InputSpec",
    "LayerResult",
    "ParityReport",
    "TensorMetrics",
    "check_parity",
    "load_inputs",
    "ort_session",
    "quant_step",
    "tensor_metrics",
]

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
MIN_FRACTION = 0.999
"""Share of elements that must be within ``max_lsb`` steps for a quantized tensor to pass."""
LSB_SLACK = 1e-3
"""Steps of slack on the LSB test: two grid values one step apart differ by 1 +- ~1e-5 steps once rounded to float32."""

_LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})

ProgressCallback = Callable[[int, int], None]


# ====================================================================================================== metrics
@dataclass(frozen=True)
class TensorMetrics:
    """Error of one candidate tensor against its reference, over all samples.

    ``max_lsb``, ``within_1_lsb`` and ``min_lsb_to_pass`` are None when the tensor is not quantized.
    ``sqnr_db`` is ``inf`` for zero error. ``min_atol_to_pass`` is the smallest ``atol`` that would pass every
    element with the given ``rtol`` (0 when none was given); ``min_lsb_to_pass`` the smallest ``max_lsb`` that would
    pass the LSB criterion (the 99.9th percentile of the error in steps).
    """

    max_abs: float
    mean_abs: float
    max_rel: float
    max_lsb: float | None
    within_1_lsb: float | None
    sqnr_db: float
    cosine: float
    min_atol_to_pass: float
    passed: bool
    min_lsb_to_pass: float | None = None
    criterion: str = "allclose"
    """'lsb' (within max_lsb steps on >= 99.9 % of elements) or 'allclose' (every element within atol + rtol|ref|)."""
    step: float | None = None
    """The quantization step when it is one per tensor (None: not quantized, or per channel)."""
    per_channel: bool = False
    elements: int = 0
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "criterion": self.criterion,
            "max_abs": _jf(self.max_abs),
            "mean_abs": _jf(self.mean_abs),
            "max_rel": _jf(self.max_rel),
            "max_lsb": _jf(self.max_lsb),
            "within_1_lsb": _jf(self.within_1_lsb),
            "sqnr_db": _jf(self.sqnr_db),
            "cosine": _jf(self.cosine),
            "min_atol_to_pass": _jf(self.min_atol_to_pass),
            "min_lsb_to_pass": _jf(self.min_lsb_to_pass),
            "step": _jf(self.step),
            "per_channel": self.per_channel,
            "elements": self.elements,
            "shape": list(self.shape),
        }

    def summary(self) -> str:
        """One line: the figures that decide (steps for quantized tensors, absolute error otherwise)."""
        parts = [f"max_abs {self.max_abs:.4g}", f"mean_abs {self.mean_abs:.3g}"]
        if self.max_lsb is not None and self.within_1_lsb is not None:
            parts.append(f"max {self.max_lsb:.3g} LSB")
            parts.append(f"within 1 LSB {100 * self.within_1_lsb:.2f}%")
        parts.append(f"SQNR {_fmt_db(self.sqnr_db)}")
        parts.append(f"cos {self.cosine:.6f}")
        if not self.passed:
            if self.criterion == "lsb" and self.min_lsb_to_pass is not None:
                parts.append(f"would pass with --max-lsb {self.min_lsb_to_pass:.3g}")
            else:
                parts.append(f"would pass with --atol {self.min_atol_to_pass:.3g}")
        return ", ".join(parts)


def _jf(x: float | None) -> float | str | None:
    """JSON-safe float: non-finite values as the strings 'inf', '-inf', 'nan' (JSON has no infinity)."""
    if x is None:
        return None
    x = float(x)
    if np.isfinite(x):
        return x
    return "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")


def _fmt_db(x: float) -> str:
    return f"{x:.1f} dB" if np.isfinite(x) else ("inf dB" if x > 0 else f"{x} dB")


@dataclass(frozen=True)
class _Step:
    """A tensor's quantization step: a scale (scalar or per channel along ``axis``), or 1 for integer codes."""

    scale: np.ndarray
    axis: int = 1
    integer: bool = False

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def broadcast(self, ndim: int) -> np.ndarray | None:
        """The scale shaped to broadcast against a tensor of rank ``ndim`` (None when it cannot)."""
        if not self.per_channel:
            return self.scale.reshape(())
        axis = self.axis + ndim if self.axis < 0 else self.axis
        if not 0 <= axis < ndim:
            return None
        shape = [1] * ndim
        shape[axis] = self.scale.size
        return self.scale.reshape(shape)


_UNIT_STEP = _Step(np.asarray(1.0), integer=True)


@dataclass(frozen=True)
class _Criterion:
    atol: float | None
    rtol: float | None
    max_lsb: float

    @property
    def explicit(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def tolerances(self) -> tuple[float, float]:
        if not self.explicit:
            return DEFAULT_ATOL, DEFAULT_RTOL
        return float(self.atol or 0.0), float(self.rtol or 0.0)


class _Accumulator:
    """Streaming error statistics for one tensor over many samples (never keeps whole tensors)."""

    def __init__(self, step: _Step | None, criterion: _Criterion, total_samples: int = 1) -> None:
        self.step = step
        self.criterion = criterion
        self.lsb_mode = step is not None and not criterion.explicit
        self.total_samples = max(1, total_samples)
        self.n = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.max_lsb: float | None = 0.0 if step is not None else None
        self.within_1 = 0
        self.within_max = 0
        self.over_tol = 0
        self.min_atol = 0.0
        self.sig = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.cand_energy = 0.0
        self.top: list[np.ndarray] = []
        self.shape: tuple[int, ...] = ()

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        if ref.shape != cand.shape:
            raise ValueError(f"shape {ref.shape} vs {cand.shape}")
        self.shape = ref.shape
        if ref.size == 0:
            return
        # int64 first: differences of uint8 codes must not wrap around
        r = ref.astype(np.int64).astype(np.float64) if ref.dtype.kind in "iub" else ref.astype(np.float64)
        c = cand.astype(np.int64).astype(np.float64) if cand.dtype.kind in "iub" else cand.astype(np.float64)
        if r.ndim == 0:  # scalars: numpy arithmetic on 0-d arrays returns immutable scalars
            r, c = r.reshape(1), c.reshape(1)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            d = np.abs(r - c)
            same = (r == c) | (np.isnan(r) & np.isnan(c))
            d[same] = 0.0
            d[np.isnan(d)] = np.inf
            absr = np.abs(r)
            self.n += d.size
            self.sum_abs += float(d.sum())
            self.max_abs = max(self.max_abs, float(d.max()))
            nz = absr > 0
            if nz.any():
                self.max_rel = max(self.max_rel, float((d[nz] / absr[nz]).max()))
            atol, rtol = self.criterion.tolerances
            self.over_tol += int(np.count_nonzero(d > atol + rtol * absr))
            rtol_eff = float(self.criterion.rtol or 0.0)
            self.min_atol = max(self.min_atol, float((d - rtol_eff * absr).max()))
            rf = np.where(np.isfinite(r), r, 0.0)
            cf = np.where(np.isfinite(c), c, 0.0)
            self.sig += float(np.sum(rf * rf))
            self.noise += float(np.sum(d * d))
            self.dot += float(np.sum(rf * cf))
            self.cand_energy += float(np.sum(cf * cf))
        if self.step is not None:
            scale = self.step.broadcast(d.ndim)
            if scale is None:  # a per-channel axis the tensor does not have: not comparable in steps
                self.step = None
                self.max_lsb = None
                self.lsb_mode = False
                self.top = []
            else:
                lsb = (d / scale).ravel()
                self.max_lsb = max(self.max_lsb or 0.0, float(lsb.max()))
                self.within_1 += int(np.count_nonzero(lsb <= 1.0 + LSB_SLACK))
                self.within_max += int(np.count_nonzero(lsb <= self.criterion.max_lsb + LSB_SLACK))
                # Keep only the largest errors of this sample: enough to find the 99.9th percentile over all
                # samples exactly (an element among the global top k is among its own sample's top k).
                k = min(lsb.size, (lsb.size * self.total_samples) // 1000 + 1)
                self.top.append(np.partition(lsb, lsb.size - k)[lsb.size - k:].astype(np.float64))

    def _need(self) -> int:
        """ceil(MIN_FRACTION * n) elements, in integers (no float rounding at the boundary)."""
        per_mille = round(MIN_FRACTION * 1000)
        return (per_mille * self.n + 999) // 1000

    def result(self) -> TensorMetrics:
        n = self.n
        step = self.step
        per_channel = bool(step is not None and step.per_channel)
        step_value = None if step is None or per_channel else float(step.scale.reshape(()))
        if n == 0:
            return TensorMetrics(0.0, 0.0, 0.0, 0.0 if step else None, 1.0 if step else None, float("inf"), 1.0, 0.0,
                                 True, 0.0 if step else None, "lsb" if self.lsb_mode else "allclose", step_value,
                                 per_channel, 0, self.shape)
        min_lsb: float | None = None
        within_1: float | None = None
        if step is not None:
            within_1 = self.within_1 / n
            buf = np.concatenate(self.top) if self.top else np.zeros(1)
            k = n - self._need() + 1
            # ragged sample sizes can leave fewer than k kept: fall back to the (conservative) maximum
            min_lsb = float(np.partition(buf, len(buf) - k)[len(buf) - k]) if len(buf) >= k else float(buf.max())
        if self.lsb_mode:
            passed = self.within_max >= self._need()
            criterion = "lsb"
        else:
            passed = self.over_tol == 0
            criterion = "allclose"
        if self.noise == 0.0:
            sqnr = float("inf")
        elif self.sig == 0.0:
            sqnr = float("-inf")
        else:
            sqnr = float(10.0 * np.log10(self.sig / self.noise)) if np.isfinite(self.noise) else float("-inf")
        if self.sig == 0.0 and self.cand_energy == 0.0:
            cosine = 1.0
        elif self.sig == 0.0 or self.cand_energy == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.clip(self.dot / np.sqrt(self.sig * self.cand_energy), -1.0, 1.0))
        return TensorMetrics(
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / n,
            max_rel=self.max_rel,
            max_lsb=self.max_lsb,
            within_1_lsb=within_1,
            sqnr_db=sqnr,
            cosine=cosine,
            min_atol_to_pass=max(0.0, self.min_atol),
            passed=passed,
            min_lsb_to_pass=min_lsb,
            criterion=criterion,
            step=step_value,
            per_channel=per_channel,
            elements=n,
            shape=tuple(int(s) for s in self.shape),
        )


def _check_tolerances(atol: float | None, rtol: float | None, max_lsb: float) -> _Criterion:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    if not (np.isfinite(max_lsb) and max_lsb > 0):
        raise UsageError(f"max_lsb must be a finite number > 0, got {max_lsb}")
    return _Criterion(None if atol is None else float(atol), None if rtol is None else float(rtol), float(max_lsb))


def tensor_metrics(
    reference: Any,
    candidate: Any,
    *,
    step: float | np.ndarray | None = None,
    axis: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    max_lsb: float = 1.0,
) -> TensorMetrics:
    """Metrics of one candidate array against a reference array, with the same pass criterion as check_parity.

    ``step`` is the tensor's quantization step (a scalar, or one per channel along ``axis``); None for a float
    tensor. Integer arrays with ``step=None`` are compared as floats (use ``step=1`` for quantized codes).
    """
    criterion = _check_tolerances(atol, rtol, max_lsb)
    q = None
    if step is not None:
        s = np.asarray(step, dtype=np.float64)
        if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise UsageError(f"step must be positive and finite, got {step}")
        q = _Step(s.reshape(()) if s.size == 1 else s.ravel(), axis=axis)
    acc = _Accumulator(q, criterion)
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape:
        raise UsageError(f"cannot compare arrays of shapes {ref.shape} and {cand.shape}")
    acc.update(ref, cand)
    return acc.result()


# ====================================================================================================== quantization
def _valid_scale(scale: np.ndarray) -> bool:
    return scale.size > 0 and bool(np.all(np.isfinite(scale))) and bool(np.all(scale > 0))


def _const_through_identity(ctx: ModelContext, tensor: str) -> np.ndarray | None:
    """A constant, also behind Identity nodes (the TorchScript exporter routes shared zero points through them)."""
    for _ in range(8):
        value = ctx.const(tensor)
        if value is not None:
            return value
        producer = ctx.producer_of(tensor)
        if producer is None or producer.op_type != "Identity" or not producer.input:
            return None
        tensor = producer.input[0]
    return None


def _qdq_step(ctx: ModelContext, node: Any) -> _Step | None:
    """The step of a Q/DQ node: its scale alone decides it (the zero point shifts the grid, not its spacing)."""
    if len(node.input) < 2 or int(ctx.attr(node, "block_size", 0) or 0):
        return None
    scale = _const_through_identity(ctx, node.input[1])
    if scale is None:
        return None
    scale = np.asarray(scale, dtype=np.float64)
    if not _valid_scale(scale):
        return None
    return _Step(scale.reshape(()) if scale.size == 1 else scale.ravel(), axis=int(ctx.attr(node, "axis", 1)))


def _step_of(ctx: ModelContext, tensor: str, depth: int = 0) -> _Step | None:
    producer = ctx.producer_of(tensor)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return _UNIT_STEP
    if producer is not None and producer.op_type == "DequantizeLinear":
        found = _qdq_step(ctx, producer)
        if found is not None:
            return found
    for consumer in ctx.consumers_of(tensor):
        if consumer.input and consumer.input[0] == tensor:
            if consumer.op_type == "QuantizeLinear":
                found = _qdq_step(ctx, consumer)
                if found is not None:
                    return found
            elif consumer.op_type == "DequantizeLinear":  # integer codes read by a DQ (e.g. a uint8 graph input)
                return _UNIT_STEP
    if producer is not None and producer.op_type in _LAYOUT_OPS and producer.input and depth < 16:
        # Reshape/Transpose/... move values without changing them: same per-tensor step as their input
        found = _step_of(ctx, producer.input[0], depth + 1)
        if found is not None and (found.integer or not found.per_channel):
            return found
    return None


def quant_step(model: Any, tensor: str) -> float | np.ndarray | None:
    """The quantization step of ``tensor`` in ``model`` (1.0 for integer Q codes), or None when it is not quantized.

    Found from the DequantizeLinear that produces it, else the QuantizeLinear that reads it, else through
    layout-only producers (Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Identity). Per-channel scales come back
    as an array.
    """
    ctx = model if isinstance(model, ModelContext) else ModelContext(as_model(model))
    step = _step_of(ctx, tensor)
    if step is None:
        return None
    return float(step.scale.reshape(())) if not step.per_channel else step.scale.copy()


# ====================================================================================================== inputs
@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and dims (int, or a str / None for a dynamic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    @property
    def dynamic(self) -> list[str]:
        if self.shape is None:
            return ["<unknown rank>"]
        return [str(d) if d is not None else "?" for d in self.shape if not isinstance(d, int) or d <= 0]


def _input_specs(ctx: ModelContext) -> list[InputSpec]:
    specs = []
    for vi in ctx.graph_inputs:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UnusableInputError(f"{ctx.name}: input {vi.name!r} is not a tensor; parity needs tensor inputs")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            raise UnusableInputError(f"{ctx.name}: input {vi.name!r} has an unsupported element type "
                                     f"{tt.elem_type}") from None
        shape: tuple[int | str | None, ...] | None = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


MAX_RANDOM_ELEMENTS = 2**27
"""Largest random input generated (elements; 512 MiB of float32): a bigger one is a typo'd dim, or needs --inputs."""


def _random_sample(specs: Sequence[InputSpec], ctx: ModelContext, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sample = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else 0 for d in spec.shape or ())  # checked static by the caller
        if int(np.prod(shape, dtype=np.float64)) > MAX_RANDOM_ELEMENTS:
            raise UsageError(f"input {spec.name!r} has shape {list(shape)}: too large for random data "
                             f"(over {MAX_RANDOM_ELEMENTS} elements); pass --inputs FILE.npz")
        if spec.dtype.kind == "f":
            lo, hi = 0.0, 1.0  # image-like: normalized pixels
            q = next((c for c in ctx.consumers_of(spec.name) if c.op_type == "QuantizeLinear"), None)
            qp = ctx.qparams(q) if q is not None else None
            if qp is not None and not qp.per_channel and qp.qrange is not None and _valid_scale(qp.scale):
                # an input quantized right away: cover its representable range, no more
                s = float(qp.scale.reshape(()))
                zp = int(qp.zero_points.reshape(()))
                lo, hi = (qp.qrange[0] - zp) * s, (qp.qrange[1] - zp + 1) * s
            sample[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            sample[spec.name] = rng.random(size=shape) < 0.5
        elif spec.dtype.kind in "iu":
            sample[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        else:
            raise UsageError(f"input {spec.name!r} of type {spec.dtype} cannot be generated; pass --inputs FILE.npz")
    return sample


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise UsageError(f"input {name!r}: cannot convert {type(value).__name__} to an array: {exc}") from None


def _split_samples(arrays: Mapping[str, Any], specs: Sequence[InputSpec], where: str) -> list[dict[str, np.ndarray]]:
    """One dict of arrays -> samples; an array with one more dim than its input carries N samples on axis 0."""
    by_name = {s.name: s for s in specs}
    arrays = {str(k): _to_numpy(v, str(k)) for k, v in arrays.items()}
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise UsageError(f"{where}: unknown input(s) {', '.join(map(repr, unknown))}; "
                         f"model inputs: {', '.join(by_name) or '(none)'}")
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise UsageError(f"{where}: missing input(s) {', '.join(map(repr, missing))}")
    counts = set()
    for name, arr in arrays.items():
        shape = by_name[name].shape
        if shape is not None and arr.ndim == len(shape) + 1:
            counts.add(arr.shape[0])
        else:
            counts.add(None)
    if counts == {None} or not arrays:
        return [dict(arrays)]
    if None in counts or len(counts) != 1:
        raise UsageError(f"{where}: inputs disagree on the number of samples (leading axis): "
                         + ", ".join(f"{n} {tuple(a.shape)}" for n, a in arrays.items()))
    n = counts.pop()
    if not n:
        raise UsageError(f"{where}: zero samples (leading axis of length 0)")
    return [{name: arr[i] for name, arr in arrays.items()} for i in range(int(n))]


def _check_sample(sample: dict[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs:
        arr = sample[spec.name]
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise UsageError(f"{where}: input {spec.name!r} has shape {tuple(arr.shape)}, the model expects rank "
                                 f"{len(spec.shape)} {_shape_str(spec.shape)}")
            for got, want in zip(arr.shape, spec.shape, strict=True):
                if isinstance(want, int) and want > 0 and got != want:
                    raise UsageError(f"{where}: input {spec.name!r} has shape {tuple(arr.shape)}, the model expects "
                                     f"{_shape_str(spec.shape)}")
        if arr.dtype != spec.dtype:
            same_kind = (arr.dtype.kind in "fiub") and (
                (arr.dtype.kind == "f") == (spec.dtype.kind == "f")
            )
            if not same_kind:
                raise UsageError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
            arr = arr.astype(spec.dtype)
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def _shape_str(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        raise UnusableInputError(f"{p}: no such file")
    if p.is_dir():
        raise UnusableInputError(f"{p}: is a directory, expected an .npz file")
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise UnusableInputError(f"{p}: not an .npz archive (a single .npy array has no input names)")
            return {k: np.asarray(data[k]) for k in data.files}
    except UnusableInputError:
        raise
    except AttributeError:  # np.load returned a plain array, which has no context manager
        raise UnusableInputError(f"{p}: not an .npz archive (a single .npy array has no input names)") from None
    except Exception as exc:
        raise UnusableInputError(f"{p}: cannot read as .npz: {first_line(exc)}") from None


def load_inputs(
    inputs: Any,
    specs: Sequence[InputSpec],
    ctx: ModelContext | None = None,
    num_samples: int = 8,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Turn ``inputs`` into a list of checked samples (dict input name -> array, dtypes cast to the model's).

    ``inputs``: None (``num_samples`` seeded random samples: float inputs uniform in [0, 1), or over the range of
    the QuantizeLinear that reads them; integer inputs in [0, 4)), a path to an ``.npz`` (keys = input names), a
    dict name -> array, a single array (one-input models), or a list / iterable of batches (consumed up front), each
    a dict, a single array, or a tuple of arrays in the model's input order.
    An array with one more dim than its input holds N samples on its leading axis. ``num_samples`` applies to
    random data only.
    """
    if inputs is None:
        if num_samples < 1:
            raise UsageError(f"num_samples must be >= 1, got {num_samples}")
        for spec in specs:
            if spec.dynamic:
                raise UsageError(
                    f"input {spec.name!r} has dynamic dims {spec.dynamic} (shape "
                    f"{_shape_str(spec.shape or ())}): random data needs a static shape; pass --inputs FILE.npz "
                    "(keys = input names), or fix the shape first (tiexport fix --input-shape)")
        if ctx is None:
            raise UsageError("random inputs need the model")
        rng = np.random.default_rng(seed)
        return [_random_sample(specs, ctx, rng) for _ in range(num_samples)]
    where = "inputs"
    raw: list[Mapping[str, Any]]
    if isinstance(inputs, (str, os.PathLike)):
        where = str(inputs)
        raw = [_load_npz(inputs)]
    elif isinstance(inputs, Mapping):
        raw = [inputs]
    elif isinstance(inputs, np.ndarray) or hasattr(inputs, "detach"):
        if len(specs) != 1:
            raise UsageError(f"a single array was given but the model has {len(specs)} inputs; pass a dict by name")
        raw = [{specs[0].name: inputs}]
    elif isinstance(inputs, Iterable):
        raw = []
        for i, item in enumerate(inputs):
            if isinstance(item, Mapping):
                raw.append(item)
            elif (isinstance(item, np.ndarray) or hasattr(item, "detach")) and len(specs) == 1:
                raw.append({specs[0].name: item})
            elif isinstance(item, (tuple, list)) and len(item) == len(specs):  # positional, in input order
                raw.append({spec.name: value for spec, value in zip(specs, item, strict=True)})
            else:
                raise UsageError(f"inputs[{i}] is a {type(item).__name__}; expected a dict input name -> array "
                                 f"(or a tuple of {len(specs)} array(s) in input order)")
        if not raw:
            raise UsageError("inputs is empty")
    else:
        raise UsageError(f"inputs must be a dict, a list of dicts, an iterable, a .npz path or None, "
                         f"got {type(inputs).__name__}")
    samples: list[dict[str, np.ndarray]] = []
    for i, item in enumerate(raw):
        label = where if len(raw) == 1 else f"{where}[{i}]"
        for sample in _split_samples(item, specs, label):
            samples.append(_check_sample(sample, specs, label))
    return samples


# ====================================================================================================== runners
def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)



def ort_session(source: str | bytes, *, optimizations: bool = False, external_folder: str | None = None) -> Any:
    """An ONNX Runtime CPU session for a model path or serialized model, made the way every parity run makes it.

    Raises what ``onnxruntime.InferenceSession`` raises; callers turn that into their own one-line error.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimizations
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 4  # failures come back as exceptions (one line); ORT's own log would add more
    # Two sessions take turns: an idle one's spinning worker threads would steal the cores the busy one needs
    # (measured 2x slower on ResNet-50 with 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """An ONNX Runtime session over a model with ``probes`` (intermediate tensors) added as extra outputs.

    The probes are appended to a *serialized* copy of the model as a second protobuf message (protobuf merges
    concatenated messages, so repeated ``graph.output`` fields append): no ModelProto copy, weights serialized
    once. External data is read by ONNX Runtime from the model's folder. ``session``: one already made by
    :func:`ort_session` for this model without probes (``fix`` makes it for its load check), used as it is.
    """

    def __init__(self, loaded: LoadedModel, probes: Sequence[str] = (), optimizations: bool = False,
                 session: Any = None) -> None:
        self.name = loaded.name
        self.output_names = [o.name for o in loaded.model.graph.output]
        declared = set(self.output_names)
        self.probes = [p for p in dict.fromkeys(probes) if p not in declared]
        if session is not None and not self.probes:
            self.session = session
            self.input_names = [i.name for i in session.get_inputs()]
            return
        source: str | bytes
        has_external = bool(external_data_info(loaded.model))
        folder = loaded.base_dir if has_external and loaded.base_dir is not None else None
        path = Path(loaded.name)
        if not self.probes and loaded.base_dir is not None and path.is_file():
            source = str(path)
        else:
            try:
                data = loaded.model.SerializeToString()
            except Exception as exc:  # > 2 GB in memory
                raise UnusableInputError(f"{loaded.name}: cannot serialize for ONNX Runtime: {first_line(exc)}"
                                         ) from None
            if self.probes:
                extra = onnx.ModelProto()
                extra.graph.output.extend(onnx.ValueInfoProto(name=p) for p in self.probes)
                data += extra.SerializeToString()
            source = data
        try:
            self.session = ort_session(source, optimizations=optimizations, external_folder=folder)
        except Exception as exc:
            raise UnusableInputError(f"{loaded.name}: ONNX Runtime cannot load the model: {first_line(exc)}"
                                     ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names + self.probes
        try:
            values = self.session.run(names, dict(feed))
        except Exception as exc:
            raise UnusableInputError(f"{self.name}: ONNX Runtime failed on the inputs: {first_line(exc)}") from None
        return dict(zip(names, (np.asarray(v) for v in values), strict=True))


def _dynamic_tensors(ctx: ModelContext) -> list[str]:
    """Outputs of top-level nodes that depend on a graph input, in topological (graph) order."""
    live = {vi.name for vi in ctx.graph_inputs}
    order = []
    for node in ctx.nodes:
        if any(i in live for i in node.input if i):
            for out in node.output:
                if out and out not in live:
                    live.add(out)
                    order.append(out)
    return order


def _probe_candidates(ctx: ModelContext) -> list[str]:
    """Tensors worth comparing per layer: dynamic, float (or of unknown type), not the integer codes of a Q."""
    keep = []
    for t in _dynamic_tensors(ctx):
        producer = ctx.producer_of(t)
        if producer is not None and producer.op_type == "QuantizeLinear":
            continue  # compared through the DQ that reads them: zero points may differ between the two models
        et = ctx.elem_type(t)
        if et is not None and et not in _FLOAT_TYPES:
            continue
        keep.append(t)
    return keep


# ====================================================================================================== report
@dataclass(frozen=True)
class LayerResult:
    """One compared intermediate (or output) tensor, in topological order."""

    tensor: str
    node: str
    op_type: str
    metrics: TensorMetrics
    module: str | None = None
    """torch reference only: the fake-quant module (qualified name, ``#k`` for its k-th call when shared)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tensor": self.tensor, "node": self.node, "op_type": self.op_type,
                             "metrics": self.metrics.to_dict()}
        if self.module is not None:
            d["module"] = self.module
        return d


@dataclass
class ParityReport:
    """Result of :func:`check_parity`. ``passed`` is True when every output passes its criterion."""

    passed: bool
    outputs: dict[str, TensorMetrics]
    first_divergence: dict[str, Any] | None
    """{"tensor", "node", "op_type", "metrics": TensorMetrics} of the first tensor over tolerance, or None."""
    layers: list[LayerResult] = field(default_factory=list)
    reference: str = ""
    candidate: str = ""
    samples: int = 0
    atol: float | None = None
    rtol: float | None = None
    max_lsb: float = 1.0
    per_layer: bool = False
    ort_optimizations: bool = False
    notes: list[str] = field(default_factory=list)

    def criterion(self) -> dict[str, Any]:
        if self.atol is None and self.rtol is None:
            return {"quantized": f"within {self.max_lsb:g} LSB on >= {100 * MIN_FRACTION:g}% of elements",
                    "float": f"|diff| <= {DEFAULT_ATOL:g} + {DEFAULT_RTOL:g} * |reference| on every element",
                    "max_lsb": self.max_lsb, "min_fraction": MIN_FRACTION, "atol": DEFAULT_ATOL,
                    "rtol": DEFAULT_RTOL}
        atol, rtol = self.atol or 0.0, self.rtol or 0.0
        return {"all": f"|diff| <= {atol:g} + {rtol:g} * |reference| on every element", "atol": atol, "rtol": rtol}

    def summary(self) -> str:
        """One line: verdict, worst output error, first divergence."""
        worst = max(self.outputs.items(), key=lambda kv: (not kv[1].passed, kv[1].max_lsb or 0.0, kv[1].max_abs),
                    default=None)
        parts = [f"{'PASSED' if self.passed else 'FAILED'} ({len(self.outputs)} output(s), {self.samples} sample(s))"]
        if worst is not None:
            parts.append(f"worst {worst[0]}: {worst[1].summary()}")
        if self.first_divergence is not None:
            parts.append(f"first divergence {self.first_divergence['tensor']} ({self.first_divergence['op_type']})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        fd = None
        if self.first_divergence is not None:
            fd = dict(self.first_divergence)
            m = fd.get("metrics")
            if isinstance(m, TensorMetrics):
                fd["metrics"] = m.to_dict()
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "samples": self.samples,
            "criterion": self.criterion(),
            "ort_optimizations": self.ort_optimizations,
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "first_divergence": fd,
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self, colour: bool = False, max_layers: int = 60) -> str:
        """Human-readable report (ANSI colours when ``colour``; the CLI enables them on a TTY only)."""
        lines = [_paint(f"parity: {self.candidate} vs {self.reference}", "bold", colour),
                 f"  {self.samples} sample(s), ONNX Runtime optimizations {'on' if self.ort_optimizations else 'off'}"]
        crit = self.criterion()
        for key in ("quantized", "float", "all"):
            if key in crit:
                lines.append(f"  criterion ({key}): {crit[key]}")
        lines.append("  outputs:")
        for name, m in self.outputs.items():
            tag = _paint("PASS", "ok", colour) if m.passed else _paint("FAIL", "error", colour)
            lines.append(f"    {tag} {name}: {m.summary()}")
        if self.per_layer:
            over = sum(1 for layer in self.layers if not layer.metrics.passed)
            lines.append(f"  layers: {len(self.layers)} compared, {over} over tolerance")
            shown = self.layers if len(self.layers) <= max_layers else [x for x in self.layers if not x.metrics.passed]
            for layer in shown[:max_layers]:
                tag = "ok  " if layer.metrics.passed else _paint("OVER", "warning", colour)
                mod = f" [{layer.module}]" if layer.module else ""
                lines.append(f"    {tag} {layer.tensor} ({layer.op_type} {layer.node}){mod}: {layer.metrics.summary()}")
            if len(shown) > max_layers:
                lines.append(f"    ... {len(shown) - max_layers} more (see --format json)")
        if self.first_divergence is not None:
            fd = self.first_divergence
            m = fd["metrics"]
            mod = f", module {fd['module']}" if fd.get("module") else ""
            lines.append(_paint(f"  first divergence: {fd['tensor']} (node {fd['node']}, {fd['op_type']}{mod})",
                                "warning", colour))
            lines.append(f"    {m.summary() if isinstance(m, TensorMetrics) else m}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        verdict = _paint("PASSED", "ok", colour) if self.passed else _paint("FAILED", "error", colour)
        lines.append(f"  verdict: {verdict}")
        return "\n".join(lines) + "\n"


_COLOURS = {"error": "\033[31m", "warning": "\033[33m", "ok": "\033[32m", "bold": "\033[1m"}


def _paint(text: str, key: str, colour: bool) -> str:
    return f"{_COLOURS[key]}{text}\033[0m" if colour else text


def _divergence(tensor: str, ctx: ModelContext | None, metrics: TensorMetrics,
                module: str | None = None) -> dict[str, Any]:
    node = ctx.producer_of(tensor) if ctx is not None else None
    d: dict[str, Any] = {
        "tensor": tensor,
        "node": (ctx.node_name(node) if ctx is not None and node is not None else ""),
        "op_type": node.op_type if node is not None else "",
        "metrics": metrics,
    }
    if module is not None:
        d["module"] = module
    return d


# ====================================================================================================== check
def check_parity(
    reference: Any,
    candidate: Any,
    inputs: Any = None,
    num_samples: int = 8,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    max_lsb: float = 1.0,
    per_layer: bool = False,
    ort_optimizations: bool = False,
    *,
    progress: ProgressCallback | None = None,
    candidate_session: Any = None,
) -> ParityReport:
    """Compare ``candidate`` (an ONNX path / ModelProto, run in ONNX Runtime) against ``reference``.

    ``reference`` is an ONNX path / ModelProto (also run in ONNX Runtime) or a ``torch.nn.Module`` (a fake-quant FX
    GraphModule or an eager module, run in eval mode with observers frozen; restored afterwards). ``inputs``: see
    :func:`load_inputs` (None: ``num_samples`` seeded random samples from the model's input shapes; dynamic dims are
    a UsageError). Pass criterion: module docstring -- by default within ``max_lsb`` steps of the tensor's own
    quantization on >= 99.9 % of elements for quantized tensors, ``atol=1e-5, rtol=1e-4`` for float ones; explicit
    ``atol``/``rtol`` apply allclose to every tensor. ``per_layer`` also compares intermediate tensors (ONNX: every
    float tensor both models share by name; torch: activation fake-quant outputs mapped to their DequantizeLinear)
    and names the first over tolerance. ORT graph optimizations are off unless ``ort_optimizations``.
    ``progress(done, total)`` is called after each sample (the CLI draws its TTY bar with it).
    ``candidate_session``: an ONNX Runtime session already made for ``candidate`` by :func:`ort_session` (with the
    same ``ort_optimizations``), reused instead of making a second one (``fix`` makes one for its load check).
    """
    criterion = _check_tolerances(atol, rtol, max_lsb)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise UsageError(f"num_samples must be an integer, got {num_samples!r}")
    cand_loaded = as_model(candidate)
    cand_ctx = ModelContext(cand_loaded)
    report_kwargs = dict(candidate=cand_loaded.name, atol=criterion.atol, rtol=criterion.rtol,
                         max_lsb=criterion.max_lsb, per_layer=per_layer, ort_optimizations=ort_optimizations)
    if _is_torch_module(reference):
        from tiexport.validators.torch_parity import run_torch_parity

        return run_torch_parity(reference, cand_loaded, cand_ctx, inputs=inputs, num_samples=int(num_samples),
                                seed=seed, criterion=criterion, per_layer=per_layer,
                                ort_optimizations=ort_optimizations, progress=progress, report_kwargs=report_kwargs,
                                candidate_session=candidate_session)
    ref_loaded = as_model(reference)
    ref_ctx = ModelContext(ref_loaded)
    specs = _input_specs(ref_ctx)
    cand_specs = _input_specs(cand_ctx)
    feed_names = _pair_inputs(specs, cand_specs, ref_loaded.name, cand_loaded.name)
    samples = load_inputs(inputs, specs, ref_ctx, int(num_samples), seed)

    out_pairs = _pair_outputs([o.name for o in ref_loaded.model.graph.output],
                              [o.name for o in cand_loaded.model.graph.output], ref_loaded.name, cand_loaded.name)
    layer_tensors: list[str] = []
    if per_layer:
        cand_tensors = set(_probe_candidates(cand_ctx))
        layer_tensors = [t for t in _probe_candidates(ref_ctx) if t in cand_tensors]
    ref_run = OnnxRunner(ref_loaded, layer_tensors, ort_optimizations)
    cand_run = OnnxRunner(cand_loaded, layer_tensors, ort_optimizations, session=candidate_session)

    def step(tensor_ref: str, tensor_cand: str) -> _Step | None:
        return _step_of(ref_ctx, tensor_ref) or _step_of(cand_ctx, tensor_cand)

    out_acc = {c: _Accumulator(step(r, c), criterion, len(samples)) for r, c in out_pairs}
    layer_acc: dict[str, _Accumulator] = {t: _Accumulator(step(t, t), criterion, len(samples)) for t in layer_tensors}
    skipped: dict[str, str] = {}
    not_float: set[str] = set()
    for i, sample in enumerate(samples):
        ref_vals = ref_run.run(sample)
        cand_vals = cand_run.run({feed_names[k]: v for k, v in sample.items()})
        for r, c in out_pairs:
            a, b = ref_vals[r], cand_vals[c]
            if a.shape != b.shape:
                raise UnusableInputError(f"output {c!r}: shape {tuple(a.shape)} in {ref_loaded.name}, "
                                         f"{tuple(b.shape)} in {cand_loaded.name}; the models do not compare")
            out_acc[c].update(a, b)
        for t in layer_tensors:
            if t in skipped:
                continue
            a, b = ref_vals[t], cand_vals[t]
            if a.dtype.kind != "f" and b.dtype.kind != "f":
                not_float.add(t)  # an index or shape tensor whose type inference could not tell: not a layer
                skipped[t] = ""
                continue
            if a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f":
                skipped[t] = f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
                continue
            layer_acc[t].update(a, b)
        if progress is not None:
            progress(i + 1, len(samples))
    for t, why in skipped.items():
        log.debug("per-layer: %s not compared (%s)", t, why)

    outputs = {c: acc.result() for c, acc in out_acc.items()}
    layers = [LayerResult(t, *_node_of(ref_ctx, t), layer_acc[t].result()) for t in layer_tensors if t not in skipped]
    first = _first_divergence(layers, outputs, cand_ctx)
    notes = []
    mismatched = [t for t in skipped if t not in not_float]
    if mismatched:
        notes.append(f"{len(mismatched)} shared tensor(s) not compared (different shape or type): "
                     + ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
    return ParityReport(passed=all(m.passed for m in outputs.values()), outputs=outputs, first_divergence=first,
                        layers=layers, reference=ref_loaded.name, samples=len(samples), notes=notes,
                        **report_kwargs)  # type: ignore[arg-type]


def _node_of(ctx: ModelContext, tensor: str) -> tuple[str, str]:
    node = ctx.producer_of(tensor)
    return (ctx.node_name(node), node.op_type) if node is not None else ("", "")


def _first_divergence(layers: Sequence[LayerResult], outputs: Mapping[str, TensorMetrics],
                      out_ctx: ModelContext) -> dict[str, Any] | None:
    """The first layer over tolerance (topological order); else the first failing output; else None."""
    for layer in layers:
        if not layer.metrics.passed:
            d: dict[str, Any] = {"tensor": layer.tensor, "node": layer.node, "op_type": layer.op_type,
                                 "metrics": layer.metrics}
            if layer.module is not None:
                d["module"] = layer.module
            return d
    for name, m in outputs.items():
        if not m.passed:
            return _divergence(name, out_ctx, m)
    return None


def _pair_inputs(ref: Sequence[InputSpec], cand: Sequence[InputSpec], ref_name: str, cand_name: str) -> dict[str, str]:
    """Reference input name -> candidate input name: by name, else by position when the names differ."""
    if {s.name for s in ref} == {s.name for s in cand}:
        return {s.name: s.name for s in ref}
    if len(ref) == len(cand):
        log.info("inputs differ by name; pairing them by position")
        return {r.name: c.name for r, c in zip(ref, cand, strict=True)}
    raise UsageError(f"{cand_name} has {len(cand)} input(s), {ref_name} has {len(ref)}: the models do not compare")


def _pair_outputs(ref: Sequence[str], cand: Sequence[str], ref_name: str, cand_name: str) -> list[tuple[str, str]]:
    """(reference output, candidate output) pairs: by name, else by position when no name is shared."""
    shared = [c for c in cand if c in set(ref)]
    if shared and len(shared) == len(cand) == len(ref):
        return [(c, c) for c in cand]
    if len(ref) == len(cand):
        if shared:
            log.info("outputs differ partly by name; pairing them by position")
        return list(zip(ref, cand, strict=True))
    if shared:
        log.info("comparing the %d output(s) both models have", len(shared))
        return [(c, c) for c in shared]
    raise UsageError(f"{cand_name} has {len(cand)} output(s), {ref_name} has {len(ref)}, none shared by name: "
                     "the models do not compare")
