"""Reusing a computed tensor while its sources are unchanged: weights are fake-quantized once per calibration.

Used by the weight fake-quant (:class:`~tiexport.quantization.fake_quantize.TidlFakeQuantize`) and the BN-folded weight
(:mod:`tiexport.quantization.conv_bn`): without autograd, PTC calibration and evaluation quantize each weight once
instead of once per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["reuse_result"]


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
