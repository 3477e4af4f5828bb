"""Observers for TIDL's 8-bit quantization schemes (their fake-quant is :mod:`tiexport.quantization.fake_quantize`).

What TIDL wants (shared TIDL reference, tidl.md §2), and what these classes produce:

- Weights: int8, symmetric (zero point 0), per-channel on axis 0 (Conv/Linear output channels) or per-tensor
  (TDA4VM, ConvTranspose). Scale ``max|w| / 127`` so the largest weight is representable without clipping.
- Activations, affine types: uint8 0..255 with a zero point.
- Activations, symmetric types: zero point 0, **uint8 for non-negative tensors, int8 otherwise**. PyTorch's own
  symmetric quint8 gives zero point 128 and wastes half the range on post-ReLU tensors; "symmetric" for TIDL means
  zero point 0 (tidl.md §2, last bullet). The dtype therefore follows the data: the observer reports ``quint8`` with
  range 0..255 while everything it has seen is non-negative and ``qint8`` with -128..127 otherwise.
- Power-of-2 types: ``scale = 2 ** ceil(log2(scale))`` (TI's wrapper; ranges only grow, nothing is clipped), with
  the zero point recomputed for the new scale (affine) or kept at 0 (symmetric).
- Range shrink (non-MSA types): each observed batch contributes its ``p``-th and ``(100 - p)``-th percentiles
  (``p`` in percent, :data:`DEFAULT_RANGE_SHRINK_PERCENTILE`) instead of its minimum and maximum: the rare outliers
  of large activation maps are clipped, small tensors (fewer than ``100 / p`` values, such as logits) are not.
  Per-batch ranges combine as :data:`DEFAULT_RANGE_AGGREGATION` says (:data:`POWER_OF_2_RANGE_AGGREGATION` for
  power-of-2 types). MSA types (``p = 0``, aggregation ``max``) keep
  the full range, the minimum and maximum over all batches, for attention networks whose rare peaks matter. TI's v2
  wrapper accepted a percentile and then dropped it (see the wrapper reference, "Known defects"); here it decides
  the range, and a test shows the two differ.

Under ``torch.distributed`` (DDP) the activation observers reduce each batch's statistics across ranks before
updating, so every rank holds the same ranges, hence the same scales, at every step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.ao.quantization.observer import ObserverBase

from tiexport.quantization import kernels
from tiexport.quantization.kernels import f32, nan_max, nan_min, power_of_2_ceil, power_of_2_ceil_scalar, tail_values

__all__ = [
    "DEFAULT_RANGE_AGGREGATION",
    "DEFAULT_RANGE_SHRINK_PERCENTILE",
    "POWER_OF_2_RANGE_AGGREGATION",
    "ActivationObserver",
    "WeightObserver",
    "batch_ends",
    "observe_scalar",
    "qparams_scalar",
    "qparams_tensor",
    "signed_tensor",
    "weight_range",
    "weight_scale",
]

log = logging.getLogger(__name__)

#: Percent of values clipped at each end of an activation's range by range shrink. Chosen from the
#: quantization-quality benchmark (bench/quant_quality.py, bench/RESULTS.md), where it was the best of the values
#: TI documents (0.01 / 0.1 / 0.25 %) on the digits CNN; TI v3's default is 0.1.
DEFAULT_RANGE_SHRINK_PERCENTILE = 0.01

#: How per-batch ranges combine: ``"max"`` keeps the widest per-batch (trimmed) range seen, so the estimate is the
#: full range of the calibration data minus each batch's outliers; ``"mean"`` averages them (TI v1's moving average,
#: torch's ``MovingAverageMinMaxObserver``), which also clips values that are merely rarer than one batch shows,
#: e.g. the extreme logits of small batches. Chosen from the benchmark as well.
DEFAULT_RANGE_AGGREGATION = "max"

#: Aggregation for power-of-2 activation types. Rounding the scale up to a power of two already leaves 0-100 %
#: headroom above the estimated range, so the widest batch buys little, while one wide batch that pushes the range
#: across a power of two doubles the step for everything. On the benchmark (bench/RESULTS.md, quality section),
#: averaging against the widest range: WT8SYMP2_AT8SYMP2 PTC +1.2 dB and QAT +2.0 dB, WC8P2_AT8P2 QAT +0.9 dB,
#: the others within 0.02 dB; for the non-power-of-2 WC8_AT8 the widest range is 3.6 dB better.
POWER_OF_2_RANGE_AGGREGATION = "mean"

# Running means of per-batch percentiles: plain cumulative mean at first (calibration sees few batches and an
# exponential average would stay biased towards the first one), then an exponential average so that QAT can follow
# activations whose range drifts while the weights change.
_MIN_AVERAGING_CONSTANT = 0.01

_EPS = torch.finfo(torch.float32).eps


def _distributed_world() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return int(torch.distributed.get_world_size())


# ------------------------------------------------------------------------------------ the observers' arithmetic
# Module-level functions of the buffers, so that the observers below and the fused QAT ops
# (tiexport.quantization.fused) run the same code.


def batch_ends(x: torch.Tensor, range_shrink_percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's range: its minimum and maximum, or with range shrink its ``p``-th and ``(100 - p)``-th
    percentiles (``p = range_shrink_percentile``, exact order statistics), as 0-d tensors."""
    flat = x.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.float()
    n = flat.numel()
    # whole values only: a tensor of fewer than 100 / p values keeps its full range
    k = math.floor(n * range_shrink_percentile / 100.0) if range_shrink_percentile > 0 else 0
    if k > 0 and 2 * k < n:
        # exactly k values lie beyond each end
        lo, hi = tail_values(flat, k + 1)
    else:
        lo, hi = torch.aminmax(flat)
    return lo, hi


def observe_scalar(x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, num_batches: torch.Tensor,
                   range_shrink_percentile: float, mean_aggregation: bool) -> None:
    """:meth:`ActivationObserver.forward`'s update of float32 CPU buffers, in Python scalars (see
    :meth:`ActivationObserver._observe_scalar`)."""
    lo_t, hi_t = batch_ends(x, range_shrink_percentile)  # float32 (the scalar path takes float32 input only)
    lo, hi = lo_t.item(), hi_t.item()
    cur_lo, cur_hi = min_val.item(), max_val.item()
    if mean_aggregation:
        n = int(num_batches)
        if n == 0:
            new_lo, new_hi = lo, hi
        else:
            # torch: clamp(1 / (float32(n) + 1), min=0.01), then min + w * (lo - min), each op in float32
            weight = max(f32(1.0 / f32(f32(n) + 1.0)), f32(_MIN_AVERAGING_CONSTANT))
            new_lo = f32(cur_lo + f32(weight * f32(lo - cur_lo)))
            new_hi = f32(cur_hi + f32(weight * f32(hi - cur_hi)))
    else:
        new_lo, new_hi = nan_min(cur_lo, lo), nan_max(cur_hi, hi)
    if new_lo != cur_lo:  # a NaN compares unequal and is written, as torch.minimum would
        min_val.fill_(new_lo)
    if new_hi != cur_hi:
        max_val.fill_(new_hi)
    num_batches.add_(1)


def qparams_scalar(min_val_t: torch.Tensor, max_val_t: torch.Tensor, eps_t: torch.Tensor, symmetric: bool,
                   force_signed: bool, power_of_2: bool) -> tuple[float, int]:
    """An activation observer's ``(scale, zero_point)`` as Python numbers from float32 CPU buffers that have seen
    data (the scale a float32 value); bit for bit :func:`qparams_tensor`."""
    min_val, max_val = min_val_t.item(), max_val_t.item()
    if not (math.isfinite(min_val) and math.isfinite(max_val)):  # inf / NaN: exactly what the tensors give
        scale_t, zero_point_t = qparams_tensor(min_val_t, max_val_t, eps_t, symmetric, force_signed, power_of_2)
        return scale_t.item(), int(zero_point_t.item())
    lo, hi = min(min_val, 0.0), max(max_val, 0.0)
    eps = eps_t.item()
    if symmetric:
        signed = force_signed or min_val < 0
        scale = max(f32(hi / 127.0), f32(-lo / 128.0)) if signed else f32(hi / 255.0)
        scale = max(scale, eps)
        if power_of_2:
            scale = power_of_2_ceil_scalar(scale)
        return f32(scale), 0  # float32 already; rounding again is a no-op that keeps it so
    scale = max(f32(f32(hi - lo) / 255.0), eps)
    if power_of_2:
        scale = power_of_2_ceil_scalar(scale)
    scale = f32(scale)
    # torch.round and Python's round both round half to even
    return scale, min(max(round(f32(-lo / scale)), 0), 255)


def signed_tensor(min_val: torch.Tensor, force_signed: bool) -> torch.Tensor:
    """Whether a symmetric activation observer is int8, as a bool tensor on the buffers' device (no host sync)."""
    if force_signed:
        return torch.ones((), dtype=torch.bool, device=min_val.device)
    return min_val < 0


def qparams_tensor(min_val: torch.Tensor, max_val: torch.Tensor, eps_t: torch.Tensor, symmetric: bool,
                   force_signed: bool, power_of_2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation observer's qparams from its buffers by tensor ops, without host syncs (CUDA; the reference of
    the scalar path)."""
    device = min_val.device
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    eps = eps_t.to(device)
    if symmetric:
        # int8: the tightest scale that covers both ends of -128..127 without clipping either; the sign decided
        # on the device (reading it, as _signed does, is a host sync on CUDA)
        scale = torch.where(signed_tensor(min_val, force_signed), torch.maximum(hi / 127.0, -lo / 128.0),
                            hi / 255.0)
        scale = torch.maximum(scale.reshape(1), eps)
        if power_of_2:
            scale = power_of_2_ceil(scale)
        zero_point = torch.zeros(1, dtype=torch.int32, device=device)
    else:
        scale = torch.maximum(((hi - lo) / 255.0).reshape(1), eps)
        if power_of_2:
            scale = power_of_2_ceil(scale)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32).reshape(1)
    return scale.float(), zero_point


def weight_range(w: torch.Tensor, per_channel: bool, ch_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's minimum and maximum, per channel on ``ch_axis`` or of the whole tensor (shape ``(1,)``)."""
    detached = w.detach()
    if detached.dtype != torch.float32:
        detached = detached.float()
    if per_channel:
        moved = detached if ch_axis == 0 else detached.transpose(0, ch_axis)
        return torch.aminmax(moved.reshape(detached.shape[ch_axis], -1), dim=1)
    lo, hi = torch.aminmax(detached)
    return lo.reshape(1), hi.reshape(1)


def weight_scale(min_val: torch.Tensor, max_val: torch.Tensor, eps: torch.Tensor, quant_max: int,
                 power_of_2: bool) -> torch.Tensor:
    """The float32 scale(s) of an observed weight, ``max(|min|, |max|) / quant_max`` (at least eps)."""
    amax = torch.maximum(min_val.neg(), max_val)
    scale = torch.maximum(amax.div_(float(quant_max)), eps)
    if power_of_2:
        scale = power_of_2_ceil(scale)
    return scale.float()


class ActivationObserver(ObserverBase):
    """Per-tensor activation observer: affine or symmetric, optional power-of-2, optional range shrink.

    ``symmetric``: zero point 0; uint8 (0..255) while the observed range is non-negative, int8 (-128..127) otherwise.
    ``range_shrink_percentile``: percent clipped at each end of every batch (0 keeps the batch's full range).
    ``range_aggregation``: ``"max"`` (widest per-batch range) or ``"mean"`` (running mean of per-batch ranges).
    ``force_signed``: with ``symmetric``, int8 even for non-negative data (a MatMul output whose inputs are signed).
    ``symmetric`` and ``range_shrink_percentile`` may be changed after construction (before calibration): the
    graph rules in :mod:`tiexport.quantization.qconfig` make MatMul inputs and network inputs symmetric that way.
    """

    eps: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    num_batches: torch.Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        *,
        symmetric: bool = False,
        power_of_2: bool = False,
        range_shrink_percentile: float = 0.0,
        range_aggregation: str = DEFAULT_RANGE_AGGREGATION,
        force_signed: bool = False,
        sync_distributed: bool = True,
        is_dynamic: bool = False,
        eps: float = _EPS,
        **kwargs: Any,
    ) -> None:
        if is_dynamic:
            raise ValueError("ActivationObserver is for static quantization only")
        if not 0.0 <= range_shrink_percentile < 50.0:
            raise ValueError(f"range_shrink_percentile must be in [0, 50), got {range_shrink_percentile}")
        if range_aggregation not in ("max", "mean"):
            raise ValueError(f"range_aggregation must be 'max' or 'mean', got {range_aggregation!r}")
        super().__init__(dtype=dtype, is_dynamic=False)
        self.range_aggregation = range_aggregation
        self.force_signed = force_signed
        self.symmetric = symmetric
        self.power_of_2 = power_of_2
        self.range_shrink_percentile = float(range_shrink_percentile)
        self.sync_distributed = sync_distributed
        self.register_buffer("eps", torch.tensor([eps]))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))
        self._seen_data = False

    # --- what torch's FX prepare/convert read; derived from the data seen so far ------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.qint8 if self._signed else torch.quint8

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:  # ObserverBase.__init__ assigns it; the data decides
        pass

    @property
    def qscheme(self) -> torch.qscheme:
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    @qscheme.setter
    def qscheme(self, value: torch.qscheme) -> None:
        pass

    @property
    def quant_min(self) -> int:
        return -128 if self._signed else 0

    @quant_min.setter
    def quant_min(self, value: int) -> None:
        pass

    @property
    def quant_max(self) -> int:
        return 127 if self._signed else 255

    @quant_max.setter
    def quant_max(self, value: int) -> None:
        pass

    @property
    def _signed(self) -> bool:
        # only symmetric quantization switches to int8; affine keeps uint8 with a zero point
        if not self.symmetric:
            return False
        if self.force_signed:
            return True
        # .item() on CPU (0.2 us) rather than a comparison op; on CUDA either is a host sync
        return (self.min_val.item() < 0) if self.min_val.device.type == "cpu" else bool(self.min_val < 0)

    def _signed_tensor(self) -> torch.Tensor:
        """:attr:`_signed` for a symmetric observer as a bool tensor on the buffers' device (no host sync)."""
        return signed_tensor(self.min_val, self.force_signed)

    # --- observation -----------------------------------------------------------------------------------------
    def _batch_range(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._batch_ends(x)
        return torch.stack([lo, hi]).to(self.min_val.dtype)

    def _batch_ends(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_ends(x, self.range_shrink_percentile)

    def _scalar_path(self, x: torch.Tensor) -> bool:
        """Whether this observation can take the Python-scalar path (:meth:`_observe_scalar`): a float32 CPU tensor,
        float32 CPU buffers, one process (DDP reduces tensors)."""
        return (kernels.CPU_FAST_PATHS and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.min_val.device.type == "cpu"
                and self.min_val.dtype == torch.float32 and (not self.sync_distributed or _distributed_world() == 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        if self._scalar_path(x):
            self._observe_scalar(x)
            return x
        stats = self._batch_range(x)
        averaged = self.range_aggregation == "mean"
        world = _distributed_world() if self.sync_distributed else 1
        if world > 1:
            if averaged:
                torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
                stats = stats / world
            else:
                # one collective for both ends: max of (-min, max)
                both = torch.stack([-stats[0], stats[1]])
                torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
                stats = torch.stack([-both[0], both[1]])
        lo, hi = stats[0], stats[1]
        # No int(self.num_batches) here: on CUDA it would force a host sync per observer per step.
        if averaged:
            first = self.num_batches == 0
            weight = torch.clamp(1.0 / (self.num_batches.to(lo.dtype) + 1.0), min=_MIN_AVERAGING_CONSTANT)
            self.min_val.copy_(torch.where(first, lo, self.min_val + weight * (lo - self.min_val)))
            self.max_val.copy_(torch.where(first, hi, self.max_val + weight * (hi - self.max_val)))
        else:
            # min_val/max_val start at +inf/-inf, so the first batch needs no special case
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)
        self.num_batches.add_(1)
        self._seen_data = True
        return x

    def _observe_scalar(self, x: torch.Tensor) -> None:
        """:meth:`forward`'s update with Python scalars: the same float32 results (see :func:`f32`), a tenth of the
        tensor ops. On CPU each small tensor op costs microseconds of dispatch, and an observer issued ~35 of them
        per batch: most of a QAT step of a small network (bench/RESULTS.md, QAT section). A test holds both paths
        equal bit for bit."""
        observe_scalar(x, self.min_val, self.max_val, self.num_batches, self.range_shrink_percentile,
                       self.range_aggregation == "mean")
        self._seen_data = True

    def _qparams_scalar(self) -> tuple[float, int] | None:
        """:meth:`calculate_qparams` as ``(scale, zero_point)`` Python numbers from the CPU buffers (the scale a
        float32 value), or None before any data was seen. Bit for bit the tensor formula (a test holds it)."""
        if not self._seen_data and int(self.num_batches) == 0:
            return None
        return qparams_scalar(self.min_val, self.max_val, self.eps, self.symmetric, self.force_signed,
                              self.power_of_2)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        device = self.min_val.device
        # int(num_batches) is a host sync on CUDA, once per observer per step: asked only while forward() has not
        # said it saw data (after construction, reset or a state_dict load)
        if not self._seen_data and int(self.num_batches) == 0:
            log.warning("activation observer has seen no data; using scale 1.0 and zero point 0")
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
        if kernels.CPU_FAST_PATHS and device.type == "cpu" and self.min_val.dtype == torch.float32:
            qparams = self._qparams_scalar()
            assert qparams is not None  # data was seen
            return (torch.tensor([qparams[0]], dtype=torch.float32),
                    torch.tensor([qparams[1]], dtype=torch.int32))
        return self._qparams_tensor()

    def _qparams_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams from the buffers by tensor ops, without host syncs (CUDA; the reference of the scalar path)."""
        return qparams_tensor(self.min_val, self.max_val, self.eps, self.symmetric, self.force_signed,
                              self.power_of_2)

    @torch.jit.export
    def reset_min_max_vals(self) -> None:
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.num_batches.zero_()
        self._seen_data = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._seen_data = False  # the loaded num_batches decides
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"symmetric={self.symmetric}, power_of_2={self.power_of_2}, "
            f"range_shrink_percentile={self.range_shrink_percentile}, range_aggregation={self.range_aggregation}, "
            f"min_val={float(self.min_val):.6g}, "
            f"max_val={float(self.max_val):.6g}"
        )


class WeightObserver(ObserverBase):
    """int8 symmetric weight observer (zero point 0), per-channel on ``ch_axis`` or per-tensor, optional power-of-2.

    The range is that of the weights at the last observation, not a running extreme: during QAT the weights move,
    and a range that can only grow (torch's ``MinMaxObserver``) keeps a stale maximum. Freezing observers freezes
    it together with the scale. Scale ``max|w| / 127``: the -128..127 grid with the largest weight at 127, so
    nothing is clipped (torch's symmetric formula divides by 127.5 and clips the largest weight by half a step).
    """

    eps: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.qint8,
        *,
        per_channel: bool = True,
        ch_axis: int = 0,
        power_of_2: bool = False,
        bits: int = 8,
        is_dynamic: bool = False,
        eps: float = _EPS,
        **kwargs: Any,
    ) -> None:
        if dtype != torch.qint8:
            raise ValueError(f"WeightObserver quantizes to qint8, got {dtype}")
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8, got {bits}")
        super().__init__(dtype=torch.qint8, is_dynamic=is_dynamic)
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.power_of_2 = power_of_2
        self.bits = bits
        self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        self.quant_min = -(2 ** (bits - 1))
        self.quant_max = 2 ** (bits - 1) - 1
        self.register_buffer("eps", torch.tensor([eps]))
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel() == 0:
            return w
        lo, hi = weight_range(w, self.per_channel, self.ch_axis)
        if self.min_val.shape != lo.shape:
            self.min_val.resize_(lo.shape)
            self.max_val.resize_(hi.shape)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        return w

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        device = self.min_val.device
        if self.min_val.numel() == 0:
            log.warning("weight observer has seen no weights; using scale 1.0 and zero point 0")
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
        scale = self._scale()
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def _scale(self) -> torch.Tensor:
        """The float32 scale(s) of the observed weight, ``max(|min|, |max|) / quant_max`` (at least eps)."""
        return weight_scale(self.min_val, self.max_val, self.eps, int(self.quant_max), self.power_of_2)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # per-channel buffers get their shape from the first observation; take the checkpoint's shape
        for name in ("min_val", "max_val"):
            key = prefix + name
            if key in state_dict:
                getattr(self, name).resize_(state_dict[key].shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, ch_axis={self.ch_axis}, power_of_2={self.power_of_2}, bits={self.bits}"


