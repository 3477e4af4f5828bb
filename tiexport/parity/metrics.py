"""Error metrics of one tensor against its reference, streamed over samples, and the pass criterion.

Pass criterion, per compared tensor (see :func:`tiexport.parity.check_parity`):

* ``atol`` and ``rtol`` both None (the default) and the tensor is quantized: the absolute error, measured in steps
  of *that tensor's own* quantization (:class:`~tiexport.parity.steps.Step`, per channel where the scale is), is at
  most ``max_lsb`` steps on at least 99.9 % of its elements (:data:`MIN_FRACTION`); a slack of 1e-3 step
  (:data:`LSB_SLACK`) absorbs float32 rounding of dequantized values.
* otherwise (float tensors, or ``atol``/``rtol`` given): every element satisfies
  ``|candidate - reference| <= atol + rtol * |reference|``; defaults ``atol=1e-5``, ``rtol=1e-4``; when only one
  of the two is given the other is 0.

Metrics: max and mean absolute error, max relative error (over non-zero reference elements), max error in steps,
share of elements within 1 step, SQNR in dB, cosine similarity, and the smallest ``atol`` (with the given ``rtol``,
else 0) and ``max_lsb`` that would have passed. :class:`Accumulator` never keeps whole tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tiexport.errors import UsageError
from tiexport.parity.steps import Step

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "LOCAL_MIN_EXACT",
    "LSB_SLACK",
    "MIN_FRACTION",
    "Accumulator",
    "Criterion",
    "TensorMetrics",
    "check_tolerances",
    "tensor_metrics",
]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
MIN_FRACTION = 0.999
"""Share of elements that must be within ``max_lsb`` steps for a quantized tensor to pass."""
LOCAL_MIN_EXACT = 0.5
"""Layer-local parity (:class:`~tiexport.parity.report.LocalParity`): share of a quantized tensor's elements that
must also be *exactly* the reference's value. Rounding ties make legitimate 1-LSB differences common where a layer
keeps its input's scale (a 2x2 average pool sums four grid values: a quarter land on a tie; measured on the timm
zoo: up to 7 % of elements), but a systematic difference (a zero point off by one, a scale off) moves most of
them."""
LSB_SLACK = 1e-3
"""Steps of slack on the LSB test: two grid values one step apart differ by 1 +- ~1e-5 steps once rounded to float32."""


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
    exact: float | None = None
    """Share of elements on the reference's own quantized value (error under half a step); None: not quantized."""

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
            "exact": _jf(self.exact),
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
class Criterion:
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


class Accumulator:
    """Streaming error statistics for one tensor over many samples (never keeps whole tensors)."""

    def __init__(self, step: Step | None, criterion: Criterion, total_samples: int = 1) -> None:
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
        self.exact = 0
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
                self.exact += int(np.count_nonzero(lsb < 0.5))
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
                                 per_channel, 0, self.shape, 1.0 if step else None)
        min_lsb: float | None = None
        within_1: float | None = None
        exact: float | None = None
        if step is not None:
            within_1 = self.within_1 / n
            exact = self.exact / n
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
            exact=exact,
        )


def check_tolerances(atol: float | None, rtol: float | None, max_lsb: float) -> Criterion:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    if not (np.isfinite(max_lsb) and max_lsb > 0):
        raise UsageError(f"max_lsb must be a finite number > 0, got {max_lsb}")
    return Criterion(None if atol is None else float(atol), None if rtol is None else float(rtol), float(max_lsb))


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
    criterion = check_tolerances(atol, rtol, max_lsb)
    q = None
    if step is not None:
        s = np.asarray(step, dtype=np.float64)
        if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise UsageError(f"step must be positive and finite, got {step}")
        q = Step(s.reshape(()) if s.size == 1 else s.ravel(), axis=axis)
    acc = Accumulator(q, criterion)
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape:
        raise UsageError(f"cannot compare arrays of shapes {ref.shape} and {cand.shape}")
    acc.update(ref, cand)
    return acc.result()

