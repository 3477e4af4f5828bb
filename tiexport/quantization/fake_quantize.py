"""TidlFakeQuantize: a plain ``FakeQuantize`` whose dtype, range and qscheme follow its observer, with torch's
fake-quant numerics computed by :mod:`tiexport.quantization.kernels` and no host syncs on CUDA. On CPU a call is one
fused op (observe + fake-quant, :mod:`tiexport.quantization.fused`) where the fast paths apply.

A plain :class:`torch.ao.quantization.FakeQuantize` subclass, never ``FusedMovingAvgObsFakeQuantize``: the fused op
has no ONNX symbolic (tidl.md §6, item 3), the plain one exports as QuantizeLinear/DequantizeLinear.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch.ao.quantization import FakeQuantize

from tiexport.quantization import fused, kernels
from tiexport.quantization.kernels import (
    FakeQuantizePerChannel,
    FakeQuantizePerTensor,
    fake_quantize_cpu,
    rounded_per_channel,
)
from tiexport.quantization.observers import ActivationObserver, WeightObserver
from tiexport.quantization.reuse import reuse_result

__all__ = ["TidlFakeQuantize"]


def _host_read(owner: torch.nn.Module, slot: str, tensor: torch.Tensor, read: Callable[[torch.Tensor], Any],
               known: Any = None) -> Any:
    """``read(tensor)``, a value read back to the host (on CUDA a sync), or the value recorded under ``slot`` while
    ``tensor`` is unchanged: the same object (a replaced buffer, from ``load_state_dict(assign=True)`` or a deep
    copy, is read again), version counter (every in-place write moves it) and storage address (assigning ``.data``
    keeps object and counter; the entry holds an alias, so the old storage cannot come back at that address).
    ``known``: the caller has just written the tensor and knows the value; it is recorded without a read."""
    try:
        state = (tensor._version, tensor.data_ptr())
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return read(tensor) if known is None else known
    cache = owner.__dict__.setdefault("_host_reads", {})
    hit = cache.get(slot)
    if known is None and hit is not None and hit[0] is tensor and hit[1] == state:
        return hit[3]
    value = read(tensor) if known is None else known
    # the alias keeps the storage read alive; the one held already does while the storage is the same
    alias = hit[2] if hit is not None and hit[0] is tensor and hit[1][1] == state[1] else tensor.detach()
    cache[slot] = (tensor, state, alias, value)
    return value


class TidlFakeQuantize(FakeQuantize):
    """A plain FakeQuantize whose dtype, range and qscheme follow its observer.

    torch's FakeQuantize copies them once at construction; the symmetric activation observer changes them with the
    data (uint8 while non-negative, int8 otherwise), and export and ``convert_fx`` must see the current values.
    """

    @property
    def dtype(self) -> torch.dtype:
        return self.activation_post_process.dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        pass

    @property
    def quant_min(self) -> int:
        return int(self.activation_post_process.quant_min)

    @quant_min.setter
    def quant_min(self, value: int) -> None:
        pass

    @property
    def quant_max(self) -> int:
        return int(self.activation_post_process.quant_max)

    @quant_max.setter
    def quant_max(self, value: int) -> None:
        pass

    @property
    def qscheme(self) -> torch.qscheme:
        return self.activation_post_process.qscheme

    @qscheme.setter
    def qscheme(self, value: torch.qscheme) -> None:
        pass

    def _enabled(self, name: str) -> bool:
        """``self.<name>[0] == 1`` for the flag buffers, read from the tensor only when it changed since the last
        read (:func:`_host_read`): on CUDA every read is a host sync, and FakeQuantize reads both flags in every
        forward. Every writer (enable_*/disable_*, ``copy_``, ``load_state_dict``, DDP's buffer broadcast) writes in
        place or replaces the tensor, which the check sees."""
        # not getattr: nn.Module.__getattr__ costs ~0.5 us, and forward reads many
        flag = cast(torch.Tensor, self._buffers[name])
        return bool(_host_read(self, name, flag, lambda t: bool(t[0] == 1)))

    #: Set on an instance (a plain attribute, no tensor write) while bias calibration runs its float pass: the
    #: module then returns its input untouched, neither observing nor quantizing (see bias_calibration).
    bypass = False
    #: Set on an instance while bias calibration records: called with each call's input and output (a forward hook
    #: without hook registration and the slower module-call path hooks take).
    probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        # FakeQuantize.forward, plus: a bypass for bias calibration's float pass, the Python-scalar observer path,
        # CPU per-tensor fake-quant by fake_quantize_cpu, and a reused output for an unchanged weight
        out = X if self.bypass else self._output(X)
        if self.probe is not None:
            self.probe(X, out)
        return out

    def _output(self, X: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and X.requires_grad:
            self.__dict__.pop("_output_cache", None)  # training holds no second copy of the weights
            return self._forward(X)
        observer = self._modules["activation_post_process"]
        if isinstance(observer, WeightObserver):
            # A weight's fake-quant output depends on the weight and the buffers of this module and its observer
            # only (a WeightObserver keeps the range of the last weight seen: observing the same weight again
            # changes nothing). PTC calibration and evaluation then fake-quantize each weight once, not per batch.
            b = cast(dict[str, torch.Tensor], self._buffers)
            o = cast(dict[str, torch.Tensor], observer._buffers)
            sources = (X, b["scale"], b["zero_point"], b["fake_quant_enabled"], b["observer_enabled"],
                       o["min_val"], o["max_val"], o["eps"])
            return cast(torch.Tensor, reuse_result(self, "_output_cache", sources, None, lambda: self._forward(X)))
        return self._forward(X)

    def _zero_points_zero(self, just_zeroed: bool) -> bool:
        """Whether every zero point is 0, read from the tensor only when it changed since the last read
        (:func:`_host_read`; on CUDA a read is a host sync): ``just_zeroed`` when this call wrote them."""
        zero_point = cast(torch.Tensor, self._buffers["zero_point"])
        return bool(_host_read(self, "zero_points_zero", zero_point, lambda t: not bool(t.any()),
                               True if just_zeroed else None))

    def _fused_observe(self, X: torch.Tensor) -> bool | None:
        """Whether a forward of ``X`` can take a fused op (:mod:`tiexport.quantization.fused`): None if
        not, else whether the op observes. The fused ops cover the CPU fast paths of :meth:`_forward` with fake
        quantization on: a float32 CPU tensor, an activation observer on its scalar path (not under DDP) or
        frozen, a weight observer (per channel: zero points known to be 0)."""
        if not (fused.FUSED_OPS and kernels.CPU_FAST_PATHS and X.dtype == torch.float32 and X.device.type == "cpu"
                and X.numel() > 0 and cast(torch.Tensor, self._buffers["scale"]).device.type == "cpu"):
            return None
        if not self._enabled("fake_quant_enabled"):
            return None
        observe = self._enabled("observer_enabled")
        observer = self._modules["activation_post_process"]
        if isinstance(observer, ActivationObserver):
            if self.is_per_channel or (observe and not observer._scalar_path(X)):
                return None
            return observe
        if isinstance(observer, WeightObserver):
            if self.is_per_channel and (X.dim() <= self.ch_axis or not (observe or self._zero_points_zero(False))):
                return None
            return observe
        return None

    def _forward(self, X: torch.Tensor) -> torch.Tensor:
        # buffers and the observer from the module's dicts: nn.Module.__getattr__ costs ~0.5 us a lookup, and this
        # runs for every fake-quant point in every step
        observer = cast(Any, self._modules["activation_post_process"])
        # autograd on (a training step; also an input that needs no gradient); PTC calibration and evaluation run
        # without autograd and keep the unfused path, where a fused op would save nothing but op dispatches
        observe = self._fused_observe(X) if torch.is_grad_enabled() else None
        if observe is not None:  # on CPU: one op forward, one backward
            if isinstance(observer, ActivationObserver):
                return fused.fake_quant_activation(X, self, observer, observe)
            out = fused.fake_quant_weight(X, self, observer, observe)
            if observe:
                self._zero_points_zero(True)  # the op has just written them
            return out
        scale_buf = cast(torch.Tensor, self._buffers["scale"])
        zero_point_buf = cast(torch.Tensor, self._buffers["zero_point"])
        cpu = (kernels.CPU_FAST_PATHS and X.device.type == "cpu" and X.dtype == torch.float32
               and scale_buf.device.type == "cpu")
        qparams: tuple[float, int] | None = None
        weight_observed = False  # True once this call wrote the (all-zero) weight zero points
        if self._enabled("observer_enabled"):
            if cpu and isinstance(observer, ActivationObserver) and X.numel() > 0 and observer._scalar_path(X):
                observer._observe_scalar(X)
                qparams = observer._qparams_scalar()
                assert qparams is not None  # it has just seen data
                if scale_buf.shape != (1,):
                    scale_buf.resize_(1)
                    zero_point_buf.resize_(1)
                scale_buf.fill_(qparams[0])
                zero_point_buf.fill_(qparams[1])
            elif isinstance(observer, WeightObserver) and X.numel() > 0:
                # the generic path below, minus the zero-point tensor and the device moves: a weight's zero point
                # is 0, and observer and buffers live on the weight's device
                observer(X.detach())
                scale = observer._scale()
                if scale_buf.shape != scale.shape:
                    scale_buf.resize_(scale.shape)
                    zero_point_buf.resize_(scale.shape)
                scale_buf.copy_(scale)
                zero_point_buf.zero_()
                weight_observed = True
            else:
                observer(X.detach())
                scale, zero_point = self.calculate_qparams()
                scale, zero_point = scale.to(scale_buf.device), zero_point.to(zero_point_buf.device)
                if scale_buf.shape != scale.shape:
                    scale_buf.resize_(scale.shape)
                    zero_point_buf.resize_(zero_point.shape)
                scale_buf.copy_(scale)
                zero_point_buf.copy_(zero_point)
        if not self._enabled("fake_quant_enabled"):
            return X
        if not cpu and isinstance(observer, ActivationObserver) and observer.symmetric and not observer.force_signed:
            # int8 or uint8 by the data's sign, which is a host sync to read on CUDA: int8 -128..127 with zero point
            # 0 is uint8 0..255 with zero point 128 (the same grid shifted by a whole number: identical results and
            # gradients), so the kernel gets 0..255 and a zero point chosen on the device
            zero_point_t = torch.where(observer._signed_tensor(), 128, 0).to(torch.int32).reshape(zero_point_buf.shape)
            return torch.fake_quantize_per_tensor_affine(X, scale_buf, zero_point_t + zero_point_buf, 0, 255)
        qmin, qmax = int(observer.quant_min), int(observer.quant_max)
        if self.is_per_channel:
            if X.dtype == torch.float32 and X.dim() > self.ch_axis and self._zero_points_zero(weight_observed):
                # zero points 0 (symmetric weights): the clamp bounds are the same for every channel. Every device:
                # on CUDA, torch's per-channel kernel reads min and max of the zero points back to the host (a
                # range check, two syncs per weight per step)
                shape = [1] * X.dim()
                shape[self.ch_axis] = -1
                scale_t = scale_buf.reshape(shape)
                if torch.is_grad_enabled() and X.requires_grad:
                    return cast(torch.Tensor, FakeQuantizePerChannel.apply(X, scale_t, qmin, qmax))
                return rounded_per_channel(X, scale_t).clamp_(qmin, qmax).mul_(scale_t)
            return torch.fake_quantize_per_channel_affine(X, scale_buf, zero_point_buf, self.ch_axis, qmin, qmax)
        if cpu:
            if qparams is None:
                qparams = (scale_buf.reshape(-1)[0].item(), int(zero_point_buf.reshape(-1)[0].item()))
            if torch.is_grad_enabled() and X.requires_grad:
                return cast(torch.Tensor, FakeQuantizePerTensor.apply(X, *qparams, qmin, qmax))
            return fake_quantize_cpu(X, *qparams, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(X, scale_buf, zero_point_buf, qmin, qmax)


