"""The quantization step of a tensor in an ONNX model: what parity measures errors in (LSB).

A tensor produced by a DequantizeLinear has its scale as step (per channel where the scale is); a tensor read by a
QuantizeLinear has that Q's scale; the integer codes of a QuantizeLinear have step 1; layout-only ops (Reshape,
Transpose...) keep their input's per-tensor step. The zero point shifts the grid, not its spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tiexport.context import ModelContext
from tiexport.onnx_io import as_model

__all__ = ["UNIT_STEP", "Step", "quant_step", "step_of", "valid_scale"]

_LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})


@dataclass(frozen=True)
class Step:
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


UNIT_STEP = Step(np.asarray(1.0), integer=True)


def valid_scale(scale: np.ndarray) -> bool:
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


def _qdq_step(ctx: ModelContext, node: Any) -> Step | None:
    """The step of a Q/DQ node: its scale alone decides it (the zero point shifts the grid, not its spacing)."""
    if len(node.input) < 2 or int(ctx.attr(node, "block_size", 0) or 0):
        return None
    scale = _const_through_identity(ctx, node.input[1])
    if scale is None:
        return None
    scale = np.asarray(scale, dtype=np.float64)
    if not valid_scale(scale):
        return None
    return Step(scale.reshape(()) if scale.size == 1 else scale.ravel(), axis=int(ctx.attr(node, "axis", 1)))


def step_of(ctx: ModelContext, tensor: str, depth: int = 0) -> Step | None:
    producer = ctx.producer_of(tensor)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return UNIT_STEP
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
                return UNIT_STEP
    if producer is not None and producer.op_type in _LAYOUT_OPS and producer.input and depth < 16:
        # Reshape/Transpose/... move values without changing them: same per-tensor step as their input
        found = step_of(ctx, producer.input[0], depth + 1)
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
    step = step_of(ctx, tensor)
    if step is None:
        return None
    return float(step.scale.reshape(())) if not step.per_channel else step.scale.copy()

