"""Bias calibration: pull each quantized layer's per-channel output mean back to the float model's.

Quantization shifts layer outputs: rounding of weights (systematic per output channel), clipping and rounding of
activations, and the errors of every layer before. TI's v2 wrapper corrects only the activation part: a hook on each
output fake-quant nudges the bias by the difference between the mean before and after that fake-quant (shared
wrapper reference, "Bias calibration"). That misses weight quantization, the larger and more systematic error.

This module does what TI's older v1 did: two passes over the same batch, both in the one prepared module (no copy of
the float model is kept):

1. the float pass: every fake-quant disabled (weights and activations), observers off, so the module computes the
   float model (batch norm must be frozen, which PTC does from the start);
2. the quantized pass: the normal forward.

For every layer with a bias whose output goes straight into a fake-quant, the per-channel mean of the float output
(input of that fake-quant in pass 1) and of the quantized output (output of that fake-quant in pass 2) are compared,
and ``bias += factor * (mean_float - mean_quantized)``. The difference includes weight and activation quantization
and the error arriving from earlier layers, so the output mean converges to the float one.

Fused Conv+BN modules get the correction on the batch-norm shift (``bn.bias``): with frozen statistics it adds to the
output one to one. Layers without a bias parameter are left alone (adding a parameter would break optimizers and
DDP). Under ``torch.distributed`` the corrections are averaged across ranks, so biases stay identical on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule, Node

from tiexport.quantization.fake_quantize import TidlFakeQuantize

__all__ = ["BiasCalibrator"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CONV_TYPES = (torch.nn.modules.conv._ConvNd,)
_LINEAR_TYPES = (torch.nn.Linear,)


@dataclass
class _Target:
    name: str
    bias: torch.nn.Parameter
    fake_quant: FakeQuantizeBase
    channel_dim: int  # 1 for conv outputs (N, C, ...), -1 for linear outputs (..., C)
    call_index: int  # which call of the (possibly shared) fake-quant module carries this layer's output


def _bias_of(module: torch.nn.Module) -> torch.nn.Parameter | None:
    bn = getattr(module, "bn", None)
    if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and isinstance(bn.bias, torch.nn.Parameter):
        return bn.bias
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.nn.Parameter) else None


def _channel_dim(module: torch.nn.Module) -> int | None:
    if isinstance(module, _CONV_TYPES):
        return 1
    if isinstance(module, _LINEAR_TYPES):
        return -1
    return None


def _channel_mean(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    x = x.detach().float()
    dim = channel_dim % x.dim()
    # a reduction over the other dims: no transposed copy of the activation
    return x.mean(dim=[d for d in range(x.dim()) if d != dim])


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


class _Removable(Protocol):
    def remove(self) -> None: ...


class _ProbeHandle:
    """Removes a probe set on a TidlFakeQuantize (the counterpart of a hook's RemovableHandle)."""

    def __init__(self, module: TidlFakeQuantize) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.probe = None


class BiasCalibrator:
    """Runs the two-pass bias correction on a prepared (fake-quant) GraphModule; see the module docstring."""

    def __init__(self, graph_module: GraphModule, factor: float, *, fixed_reference: bool = False) -> None:
        if factor < 0:
            raise ValueError(f"bias calibration factor must be >= 0, got {factor}")
        self.graph_module = graph_module
        self.factor = float(factor)
        self.targets = self._find_targets(graph_module)
        # PTC: the float pass runs with the biases as they were before any correction, so the reference is the
        # float model itself; with the corrected biases the reference of every later layer would drift with the
        # corrections. QAT trains the biases, and its reference is the float form of the current model.
        self._reference_biases: list[torch.Tensor] | None = (
            [t.bias.detach().clone() for t in self.targets] if fixed_reference else None
        )
        self._pending: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        # the float pass bypasses tiexport's fake-quants by a plain attribute; others (user qconfigs) by their flag
        # buffers, saved and restored (a flag write is a tensor op, and on CUDA its next read a host sync)
        fake_quants = [m for m in graph_module.modules() if isinstance(m, FakeQuantizeBase)]
        self._bypassed = [m for m in fake_quants if isinstance(m, TidlFakeQuantize)]
        self._toggled = [m for m in fake_quants if not isinstance(m, TidlFakeQuantize)]
        log.debug("bias calibration on %d layer(s): %s", len(self.targets), ", ".join(t.name for t in self.targets))

    @staticmethod
    def _find_targets(graph_module: GraphModule) -> list[_Target]:
        # several names may point at one shared fake-quant module: count calls per module instance
        modules = dict(graph_module.named_modules(remove_duplicate=False))
        targets: list[_Target] = []
        calls: dict[int, int] = {}  # id(fake-quant module) -> calls so far, in graph (= execution) order
        call_of: dict[Node, int] = {}
        for node in graph_module.graph.nodes:
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, FakeQuantizeBase):
                call_of[node] = calls.get(id(module), 0)
                calls[id(module)] = call_of[node] + 1
        for node in graph_module.graph.nodes:
            if node.op != "call_module":
                continue
            module = modules.get(str(node.target))
            if module is None or isinstance(module, FakeQuantizeBase):
                continue
            bias, dim = _bias_of(module), _channel_dim(module)
            if bias is None or dim is None or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            fake_quant = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(fake_quant, FakeQuantizeBase):
                targets.append(_Target(str(node.target), bias, fake_quant, dim, call_of[user]))
        return targets

    def apply_pending(self) -> None:
        """Apply corrections computed while autograd needed the old bias values (QAT)."""
        with torch.no_grad():
            for bias, delta in self._pending:
                bias.add_(delta)
        self._pending.clear()

    def _record(self, which: str) -> tuple[dict[int, torch.Tensor], list[_Removable]]:
        """Per-channel means of each target's fake-quant input (``which="input"``, the float pass) or output (the
        quantized pass), by target index, filled while the caller runs one pass; remove the handles afterwards.

        tiexport's fake-quants take a probe (a plain attribute their forward calls); other fake-quants get a forward
        hook. With hooks, registered and removed twice per batch and forcing the slower module-call path, recording
        cost 0.46 ms of a 6.1 ms digits-CNN PTC batch (the means another 0.3 ms); probes made the batch 5.9 ms."""
        means: dict[int, torch.Tensor] = {}
        handles: list[_Removable] = []
        by_module: dict[int, tuple[FakeQuantizeBase, list[tuple[int, _Target]]]] = {}
        for index, target in enumerate(self.targets):
            by_module.setdefault(id(target.fake_quant), (target.fake_quant, []))[1].append((index, target))
        for module, entries in by_module.values():
            calls = [0]  # calls of this module in this pass: a shared fake-quant runs once per use

            def record(inputs: torch.Tensor, output: torch.Tensor,
                       entries: list[tuple[int, _Target]] = entries, calls: list[int] = calls) -> None:
                call = calls[0]
                calls[0] += 1
                value = inputs if which == "input" else output
                for index, target in entries:
                    if target.call_index != call:
                        continue  # only the call after this target's layer counts
                    if value.dim() == 0 or value.shape[target.channel_dim] != target.bias.numel():
                        continue
                    means[index] = _channel_mean(value, target.channel_dim)

            if isinstance(module, TidlFakeQuantize):
                module.probe = record
                handles.append(_ProbeHandle(module))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, inputs, output, record=record: record(inputs[0], output)))
        return means, handles

    def step(self, run: Callable[[], T]) -> T:
        """One calibrated forward: float pass, quantized pass, bias update. Returns the quantized pass's result."""
        self.apply_pending()
        if not self.targets or self.factor == 0.0:
            return run()
        bypassed, toggled = self._bypassed, self._toggled
        saved = [(m.fake_quant_enabled.clone(), m.observer_enabled.clone()) for m in toggled]
        float_means, handles = self._record("input")
        corrected = [t.bias.detach().clone() for t in self.targets] if self._reference_biases is not None else None
        try:
            for fq in bypassed:
                fq.bypass = True
            for other in toggled:
                other.disable_fake_quant()
                other.disable_observer()
            with torch.no_grad():
                if self._reference_biases is not None:
                    for t, b in zip(self.targets, self._reference_biases, strict=True):
                        t.bias.copy_(b)
                run()
        finally:
            for h in handles:
                h.remove()
            if corrected is not None:
                with torch.no_grad():
                    for t, b in zip(self.targets, corrected, strict=True):
                        t.bias.copy_(b)
            for fq in bypassed:
                fq.bypass = False
            for other, (fq_on, obs_on) in zip(toggled, saved, strict=True):
                other.fake_quant_enabled.copy_(fq_on)
                other.observer_enabled.copy_(obs_on)
        quant_means, handles = self._record("output")
        try:
            result = run()
        finally:
            for h in handles:
                h.remove()
        self._update(float_means, quant_means)
        return result

    def _update(self, float_means: dict[int, torch.Tensor], quant_means: dict[int, torch.Tensor]) -> None:
        indices = [i for i in range(len(self.targets)) if i in float_means and i in quant_means]
        if not indices:
            return
        deltas = [self.factor * (float_means[i] - quant_means[i]) for i in indices]
        world = _world_size()
        if world > 1:
            flat = torch.cat(deltas)
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            deltas = list(torch.split(flat / world, [d.numel() for d in deltas]))
        updates = [
            (self.targets[i].bias, d.to(self.targets[i].bias.dtype)) for i, d in zip(indices, deltas, strict=True)
        ]
        if torch.is_grad_enabled():
            # autograd may still need the current bias for the backward of this step's output
            self._pending.extend(updates)
        else:
            self._pending.extend(updates)
            self.apply_pending()
