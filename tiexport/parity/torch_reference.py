"""The torch side of parity: a ``torch.nn.Module`` as reference for a QDQ ONNX candidate run in ONNX Runtime.

:func:`tiexport.parity.check_parity` comes here when its reference is a torch module; torch is imported
at use, never at module level (the mapping helpers here work without torch).

The reference (a fake-quant FX GraphModule from ``prepare_qat_fx``/``prepare_fx``, tiexport's wrapper, or an eager
module) runs in eval mode under ``no_grad`` with its observers frozen, so that checking parity never moves a scale;
training flags and observer buffers are restored afterwards.

Per layer, forward hooks on the activation fake-quant points (``torch.ao.quantization`` ``FakeQuantizeBase``
subclasses, and observers not inside one) record their outputs, keyed by the module's qualified name and the call
index (a shared fake-quant module fires once per use). Calls on weights (a ``Parameter`` input, or a module whose
name says ``weight``) are left out. Each point is mapped to the DequantizeLinear that carries it in the ONNX:

1. by name: exporters name Q/DQ nodes after the fake-quant module (the TorchScript exporter writes
   ``/activation_post_process_1/DequantizeLinear``, and ``/activation_post_process_2_1/...`` for the second call of
   a shared one; tiexport's exporter uses the module name with ``.`` as ``_`` or ``/``). A node belongs to the
   longest module name it contains as a whole token (``activation_post_process_1`` is not in ``..._10``); a module
   whose number of calls equals its number of nodes is zipped with them in topological order;
2. by order: the points left are zipped, in execution order, with the activation DequantizeLinear nodes left, in
   topological order, when both counts agree; otherwise they are reported as unmapped.

The candidate's DequantizeLinear gives the quantization step of each point (shared TIDL notes §6.4: users cannot tell
which layer of a QAT model diverges in ONNX Runtime; this names it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from tiexport import limits
from tiexport.context import ModelContext
from tiexport.errors import UnusableInputError, UsageError, first_line
from tiexport.onnx_io import LoadedModel
from tiexport.parity.inputs import input_specs, load_inputs
from tiexport.parity.metrics import Accumulator
from tiexport.parity.report import LayerResult, ParityReport, first_divergence
from tiexport.parity.runner import OnnxRunner, check_tensor_sizes
from tiexport.parity.steps import Step, step_of, valid_scale

__all__ = [
    "PointMatch",
    "TorchReference",
    "activation_dq_nodes",
    "fake_quant_modules",
    "map_fake_quant_points",
    "run_torch_parity",
]

log = logging.getLogger(__name__)

Point = tuple[str, int]
"""A fake-quant point: (module qualified name, call index within one forward)."""


# ====================================================================================================== mapping
@dataclass(frozen=True)
class PointMatch:
    """A torch fake-quant point and the ONNX DequantizeLinear output that carries it."""

    module: str
    call: int
    tensor: str
    node: str
    op_type: str
    how: str
    """'name' (matched by module name) or 'order' (by position among the points left)."""

    @property
    def label(self) -> str:
        return self.module if self.call == 0 else f"{self.module}#{self.call}"


def _norm(name: str) -> str:
    return re.sub(r"[./:\\\-]+", "_", name).lower()


def _contains_token(haystack: str, needle: str) -> bool:
    """``needle`` occurs in ``haystack`` not glued to letters or digits on either side."""
    if not needle:
        return False
    for m in re.finditer(re.escape(needle), haystack):
        before = haystack[m.start() - 1] if m.start() > 0 else "_"
        after = haystack[m.end()] if m.end() < len(haystack) else "_"
        if not before.isalnum() and not after.isalnum():
            return True
    return False


def activation_dq_nodes(ctx: ModelContext) -> list[Any]:
    """DequantizeLinear nodes on activations (not on constant weights or biases), in topological order."""
    return [n for n in ctx.nodes
            if n.op_type == "DequantizeLinear" and n.output and n.output[0] and not ctx.is_weight_dq(n)]


def map_fake_quant_points(points: Sequence[Point], ctx: ModelContext) -> tuple[list[PointMatch], list[str]]:
    """Map torch fake-quant points (execution order) to ONNX activation DQ outputs; returns (matches, notes).

    Matches come back in the ONNX topological order. See the module docstring for the rules.
    """
    dqs = activation_dq_nodes(ctx)
    topo = {id(n): i for i, n in enumerate(dqs)}
    modules = list(dict.fromkeys(m for m, _ in points))
    normed = {m: _norm(m) for m in modules}
    nodes_of: dict[str, list[Any]] = {m: [] for m in modules}
    for dq in dqs:
        keys = [ctx.node_name(dq)]
        q = ctx.producer_of(dq.input[0]) if dq.input else None
        if q is not None and q.op_type == "QuantizeLinear":
            keys.append(ctx.node_name(q))
        best: str | None = None
        for key in map(_norm, keys):
            for m in modules:
                if (best is None or len(normed[m]) > len(normed[best])) and _contains_token(key, normed[m]):
                    best = m
        if best is not None:
            nodes_of[best].append(dq)

    calls_of: dict[str, list[Point]] = {m: [] for m in modules}
    for p in points:
        calls_of[p[0]].append(p)
    matched: dict[Point, Any] = {}
    how: dict[Point, str] = {}
    notes: list[str] = []
    for m in modules:
        calls, nodes = calls_of[m], nodes_of[m]
        if nodes and len(calls) == len(nodes):
            for p, dq in zip(calls, nodes, strict=True):
                matched[p], how[p] = dq, "name"
        elif nodes:
            log.debug("fake-quant %s: %d call(s) but %d DQ node(s) named after it", m, len(calls), len(nodes))
    used = {id(n) for n in matched.values()}
    rest_points = [p for p in points if p not in matched]
    rest_nodes = [n for n in dqs if id(n) not in used]
    if rest_points and len(rest_points) == len(rest_nodes):
        for p, dq in zip(rest_points, rest_nodes, strict=True):
            matched[p], how[p] = dq, "order"
    elif rest_points:
        notes.append(f"{len(rest_points)} fake-quant point(s) not mapped to the ONNX model "
                     f"({len(rest_nodes)} activation DequantizeLinear node(s) left): "
                     + ", ".join(PointMatch(m, c, "", "", "", "").label for m, c in rest_points[:5])
                     + (" ..." if len(rest_points) > 5 else ""))
    result = [PointMatch(p[0], p[1], dq.output[0], ctx.node_name(dq), dq.op_type, how[p]) for p, dq in matched.items()]
    result.sort(key=lambda pm: topo[id(ctx.producer_of(pm.tensor))])
    return result, notes


# ====================================================================================================== torch side
def fake_quant_modules(module: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every fake-quant module, and of every observer not inside one, pre-order."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    found: list[tuple[str, Any]] = []
    inside: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue  # the observer a FakeQuantize owns: the FakeQuantize is the point
        if isinstance(m, FakeQuantizeBase):
            inside.append(name)
            found.append((name, m))
        elif isinstance(m, ObserverBase):
            found.append((name, m))
    return found


def _is_weight_name(name: str) -> bool:
    return "weight" in name.rsplit(".", 1)[-1].lower()


def _flatten(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


class TorchReference:
    """Runs a torch module on numpy inputs; optionally records its activation fake-quant outputs.

    Use as a context manager: entering switches to eval mode and freezes observers, exiting restores both.
    """

    def __init__(self, module: Any, input_names: Sequence[str], capture: bool = False) -> None:
        self.module = module
        self.input_names = list(input_names)
        self.capture = capture
        self.points = fake_quant_modules(module) if capture else []
        self.recording = capture
        """Record fake-quant outputs on the next runs (hooks stay registered; off skips the copies)."""
        self._events: list[tuple[Point, np.ndarray]] = []
        self._calls: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._training: list[tuple[Any, bool]] = []
        self._buffers: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> TorchReference:
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase

        self._training = [(m, m.training) for m in self.module.modules()]
        for m in self.module.modules():
            if isinstance(m, (FakeQuantizeBase, ObserverBase)):
                for bname, buf in m._buffers.items():
                    if buf is not None:
                        self._buffers.append((m, bname, buf.detach().clone()))
        self.module.eval()
        for m in self.module.modules():
            if isinstance(m, FakeQuantizeBase):
                m.disable_observer()  # a parity check must not move a scale
        for name, m in self.points:
            self._hooks.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m, bname, buf in self._buffers:
            m._buffers[bname] = buf  # also restores observers' min/max, which plain observers update on forward
        for m, training in self._training:
            m.training = training

    def _hook(self, name: str) -> Any:
        import torch

        weight_name = _is_weight_name(name)

        def hook(mod: Any, args: Any, out: Any) -> None:
            first = args[0] if isinstance(args, tuple) and args else args
            if (not self.recording or weight_name or isinstance(first, torch.nn.Parameter)
                    or not isinstance(out, torch.Tensor)):
                return
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            self._events.append(((name, call), out.detach().float().cpu().numpy().copy()))

        return hook

    def steps(self) -> dict[str, Any]:
        """Quantization step of each fake-quant point (its own scale, the reference grid); observers have none."""
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase

        steps: dict[str, Any] = {}
        for name, m in self.points:
            scale = getattr(m, "scale", None) if isinstance(m, FakeQuantizeBase) else None
            if scale is None or not hasattr(scale, "detach") or scale.numel() == 0:
                continue
            s = scale.detach().double().cpu().numpy().ravel()
            if valid_scale(s):
                steps[name] = Step(s.reshape(()) if s.size == 1 else s, axis=int(getattr(m, "ch_axis", 1)))
        return steps

    def run(self, feed: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], list[tuple[Point, np.ndarray]]]:
        """Outputs (flattened, in order) and the recorded fake-quant points of one forward pass."""
        import torch

        from tiexport import compat

        device = compat.module_device(self.module)
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in self.input_names]
        self._events = []
        self._calls = {}
        try:
            with torch.no_grad():
                out = self.module(*args)
        except Exception as exc:
            text = first_line(exc)
            raise UnusableInputError(f"the torch reference failed on the inputs: {type(exc).__name__}: {text}"
                                     ) from None
        outputs = [t.detach().cpu().numpy() for t in _flatten(out)]
        return outputs, self._events


def run_torch_parity(
    module: Any,
    cand_loaded: LoadedModel,
    cand_ctx: ModelContext,
    *,
    inputs: Any,
    num_samples: int,
    seed: int,
    criterion: Any,
    per_layer: bool,
    ort_optimizations: bool,
    progress: Any,
    report_kwargs: dict[str, Any],
    candidate_session: Any = None,
) -> Any:
    """check_parity with a torch reference (called by :func:`tiexport.parity.check_parity`)."""
    specs = input_specs(cand_ctx)
    samples = load_inputs(inputs, specs, cand_ctx, num_samples, seed)
    check_tensor_sizes(cand_ctx)
    out_names = [o.name for o in cand_loaded.model.graph.output]
    notes: list[str] = []
    ref_name = f"<torch {type(module).__name__}>"
    # Hooks always: the first run maps fake-quant points to ONNX tensors, which also gives each output the step
    # of the reference's own fake-quant (a wrong scale in the candidate must not shrink its errors). Later runs
    # record only for per_layer.
    with TorchReference(module, [s.name for s in specs], capture=True) as ref:
        first_out, first_events = ref.run(samples[0])
        ref.recording = per_layer
        if len(first_out) != len(out_names):
            raise UsageError(f"the torch module returns {len(first_out)} tensor(s), {cand_loaded.name} has "
                             f"{len(out_names)} output(s): they do not compare")
        matches, map_notes = map_fake_quant_points([p for p, _ in first_events], cand_ctx)
        ref_steps = ref.steps()
        step_of_tensor = {m.tensor: ref_steps.get(m.module) for m in matches}
        if per_layer:
            if not ref.points:
                notes.append("the torch module has no fake-quant modules or observers: no per-layer comparison")
            notes.extend(map_notes)
        else:
            matches = []
        probes = [m.tensor for m in matches]
        cand_run = OnnxRunner(cand_loaded, probes, ort_optimizations, session=candidate_session)
        total = len(samples)

        def step(tensor: str) -> Any:
            return step_of_tensor.get(tensor) or step_of(cand_ctx, tensor)

        out_acc = [Accumulator(step(n), criterion, total) for n in out_names]
        layer_acc = {(m.module, m.call): Accumulator(step(m.tensor), criterion, total) for m in matches}
        by_point = {(m.module, m.call): m for m in matches}
        skipped: set[Point] = set()
        for i, sample in enumerate(samples):
            limits.check()
            outs, events = (first_out, first_events) if i == 0 else ref.run(sample)
            cand_vals = cand_run.run(sample)
            for name, acc, a in zip(out_names, out_acc, outs, strict=False):
                b = cand_vals[name]
                if a.shape != b.shape:
                    raise UnusableInputError(f"output {name!r}: shape {tuple(a.shape)} from torch, {tuple(b.shape)} "
                                             f"in {cand_loaded.name}; they do not compare")
                acc.update(a, b)
            for point, value in events:
                pm = by_point.get(point)
                if pm is None or point in skipped:
                    continue
                b = cand_vals[pm.tensor]
                if value.shape != b.shape:
                    log.debug("fake-quant %s: shape %s vs ONNX %s %s", pm.label, value.shape, pm.tensor, b.shape)
                    skipped.add(point)
                    continue
                layer_acc[point].update(value, b)
            if progress is not None:
                progress(i + 1, total)
    outputs = {name: acc.result() for name, acc in zip(out_names, out_acc, strict=True)}
    layers = [LayerResult(m.tensor, m.node, m.op_type, layer_acc[(m.module, m.call)].result(), module=m.label)
              for m in matches if (m.module, m.call) not in skipped]
    if skipped:
        notes.append(f"{len(skipped)} mapped fake-quant point(s) not compared: shapes differ from their ONNX tensor")
    return ParityReport(passed=all(m.passed for m in outputs.values()), outputs=outputs,
                        first_divergence=first_divergence(layers, outputs, cand_ctx), layers=layers,
                        reference=ref_name, samples=len(samples), notes=notes, **report_kwargs)
