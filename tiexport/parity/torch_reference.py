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
from tiexport.context import ModelContext, outer_references
from tiexport.errors import UnusableInputError, UsageError, first_line
from tiexport.onnx_io import LoadedModel
from tiexport.parity.inputs import input_specs, load_inputs
from tiexport.parity.metrics import Accumulator
from tiexport.parity.report import LayerResult, LocalParity, ParityReport, first_divergence, locally_passed
from tiexport.parity.runner import OnnxRunner, check_tensor_sizes, forced_input_name
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
    local: bool = True,
) -> Any:
    """check_parity with a torch reference (called by :func:`tiexport.parity.check_parity`).

    ``local``: when an output fails end to end, run the layer-local comparison (:class:`LocalParity`).
    """
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
        all_matches = matches
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
        cand_outputs: list[dict[str, np.ndarray]] = []  # kept (outputs only, small) for the ORT-self measure
        for i, sample in enumerate(samples):
            limits.check()
            outs, events = (first_out, first_events) if i == 0 else ref.run(sample)
            cand_vals = cand_run.run(sample)
            cand_outputs.append({n: cand_vals[n] for n in out_names})
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
        local_result = None
        if local and not all(m.passed for m in outputs.values()):
            if all_matches:
                local_result = _local_parity(ref, cand_loaded, cand_ctx, all_matches, samples, first_out,
                                             first_events, step, criterion, ort_optimizations, notes,
                                             cand_outputs)
            else:
                notes.append("no fake-quant point maps to the ONNX model: no layer-local comparison")
    layers = [LayerResult(m.tensor, m.node, m.op_type, layer_acc[(m.module, m.call)].result(), module=m.label)
              for m in matches if (m.module, m.call) not in skipped]
    if skipped:
        notes.append(f"{len(skipped)} mapped fake-quant point(s) not compared: shapes differ from their ONNX tensor")
    end_to_end = all(m.passed for m in outputs.values())
    return ParityReport(passed=end_to_end or (local_result is not None and local_result.passed), outputs=outputs,
                        first_divergence=first_divergence(layers, outputs, cand_ctx), layers=layers,
                        reference=ref_name, samples=len(samples), notes=notes, local=local_result, **report_kwargs)


def _local_parity(ref: TorchReference, cand_loaded: LoadedModel, cand_ctx: ModelContext,
                  matches: Sequence[PointMatch], samples: Sequence[Mapping[str, np.ndarray]],
                  first_out: Sequence[np.ndarray], first_events: Sequence[tuple[Point, np.ndarray]],
                  step: Any, criterion: Any, ort_optimizations: bool, notes: list[str],
                  cand_outputs: Sequence[Mapping[str, np.ndarray]]) -> LocalParity | None:
    """The candidate run with every mapped activation DequantizeLinear's consumers fed the reference's fake-quant
    output for that point, each layer compared with the reference; None (and a note) when it cannot run.

    Tensors read inside If/Loop/Scan bodies are not fed (the bodies keep the candidate's own values); the
    candidate's outputs are compared as computed from fed inputs too. Also measures how far ONNX Runtime's
    optimized run is from its unoptimized one on the same inputs (:attr:`LocalParity.ort_self_lsb`): the end-to-end
    pass already ran the candidate one way (``cand_outputs``, with ``ort_optimizations``), so only the other runs.
    """
    import onnx

    read_in_bodies: set[str] = set()
    for node in cand_ctx.nodes:
        read_in_bodies |= outer_references(node)
    forced = {m.tensor: (cand_ctx.elem_type(m.tensor) or onnx.TensorProto.FLOAT) for m in matches
              if m.tensor not in read_in_bodies}
    if not forced:
        notes.append("no mapped activation can be fed from the reference: no layer-local comparison")
        return None
    dtypes = {t: onnx.helper.tensor_dtype_to_np_dtype(et) for t, et in forced.items()}
    out_names = [o.name for o in cand_loaded.model.graph.output]
    by_point = {(m.module, m.call): m for m in matches}
    total = len(samples)
    layer_acc = {(m.module, m.call): Accumulator(step(m.tensor), criterion, total) for m in matches}
    out_acc = {n: Accumulator(step(n), criterion, total) for n in out_names}
    mismatches = _grid_mismatches(ref, cand_ctx, matches)
    try:
        runner = OnnxRunner(cand_loaded, (), ort_optimizations, forced=forced)
    except UnusableInputError as exc:
        notes.append(f"layer-local comparison not run: {exc}")
        return None
    ref.recording = True
    compared: set[Point] = set()
    for i, sample in enumerate(samples):
        limits.check()
        outs, events = (first_out, first_events) if i == 0 else ref.run(sample)
        feed = dict(sample)
        for point, value in events:
            pm = by_point.get(point)
            if pm is not None and pm.tensor in forced:
                feed[forced_input_name(pm.tensor)] = value.astype(dtypes[pm.tensor], copy=False)
        missing = [t for t in forced if forced_input_name(t) not in feed]
        if missing:
            notes.append(f"layer-local comparison not run: the reference did not reach {missing[0]!r} "
                         f"on sample {i}")
            return None
        try:
            vals = runner.run(feed)
        except UnusableInputError as exc:
            notes.append(f"layer-local comparison not run: {exc}")
            return None
        for name, a in zip(out_names, outs, strict=False):
            b = vals[name]
            if a.shape == b.shape:
                out_acc[name].update(a, b)
        for point, value in events:
            pm = by_point.get(point)
            if pm is None:
                continue
            got = vals.get(pm.tensor)
            if got is not None and got.shape == value.shape:
                layer_acc[point].update(value, got)
                compared.add(point)
    del runner
    layers = [LayerResult(m.tensor, m.node, m.op_type, layer_acc[(m.module, m.call)].result(), module=m.label)
              for m in matches if (m.module, m.call) in compared]
    outputs = {n: acc.result() for n, acc in out_acc.items()}
    passed = (not mismatches and all(locally_passed(x.metrics) for x in layers)
              and all(locally_passed(m) for m in outputs.values()))
    return LocalParity(passed=passed, layers=layers, outputs=outputs, forced=len(forced), grid_mismatches=mismatches,
                       ort_self_lsb=(_ort_self_lsb(cand_loaded, samples, cand_outputs, not ort_optimizations, step)
                                     if passed else None))


Grid = tuple[np.ndarray, np.ndarray, np.ndarray]
"""A quantization grid in real values: (scale, lowest value, highest value), per tensor or per channel."""


def _reference_grid(module: Any) -> Grid | None:
    """The grid of a torch fake-quant module (None for observers and modules without scale and range)."""
    scale, zp = getattr(module, "scale", None), getattr(module, "zero_point", None)
    qmin, qmax = getattr(module, "quant_min", None), getattr(module, "quant_max", None)
    if scale is None or zp is None or qmin is None or qmax is None or not hasattr(scale, "detach"):
        return None
    s = scale.detach().double().cpu().numpy().ravel()
    z = zp.detach().double().cpu().numpy().ravel()
    if s.size == 0 or not valid_scale(s) or z.size not in (1, s.size):
        return None
    return s, (qmin - z) * s, (qmax - z) * s


def _onnx_grid(ctx: ModelContext, node: Any) -> Grid | None:
    q = ctx.qparams(node)
    if q is None or q.qrange is None or not valid_scale(np.asarray(q.scale, np.float64).ravel()):
        return None
    s = np.asarray(q.scale, np.float64).ravel()
    z = q.zero_points.astype(np.float64).ravel()
    lo, hi = q.qrange
    return s, (lo - z) * s, (hi - z) * s


def _grid_difference(ref: Grid, cand: Grid) -> str | None:
    """What differs between two grids (None: the same values, to float32 precision)."""
    for what, a, b in (("scale", ref[0], cand[0]), ("lowest value", ref[1], cand[1]),
                       ("highest value", ref[2], cand[2])):
        if a.size != b.size and 1 not in (a.size, b.size):
            return f"{b.size} scale(s) in the ONNX, {a.size} in torch"
        tol = 1e-6 * np.maximum(np.abs(a), ref[0])
        if not np.all(np.abs(a - b) <= tol):
            k = int(np.argmax(np.abs(a - b) - tol)) if a.size == b.size else 0
            av, bv = float(a.ravel()[min(k, a.size - 1)]), float(b.ravel()[min(k, b.size - 1)])
            return f"{what} {bv:.6g} in the ONNX, {av:.6g} in torch"
    return None


def _grid_mismatches(ref: TorchReference, ctx: ModelContext, matches: Sequence[PointMatch]) -> list[str]:
    """Mapped points whose ONNX DequantizeLinear (or the QuantizeLinear feeding it) is on another grid than the
    torch fake-quant: the candidate quantizes differently there (a wrong scale, a zero point off by one)."""
    modules = dict(ref.points)
    out = []
    for m in matches:
        module = modules.get(m.module)
        ref_grid = _reference_grid(module) if module is not None else None
        dq = ctx.producer_of(m.tensor)
        if ref_grid is None or dq is None:
            continue
        nodes = [dq]
        q = ctx.producer_of(dq.input[0]) if dq.input else None
        if q is not None and q.op_type == "QuantizeLinear":
            nodes.append(q)
        for node in nodes:
            grid = _onnx_grid(ctx, node)
            diff = _grid_difference(ref_grid, grid) if grid is not None else None
            if diff is not None:
                out.append(f"{m.label} ({ctx.node_name(node)}): {diff}")
                break
    return out


def _ort_self_lsb(cand_loaded: LoadedModel, samples: Sequence[Mapping[str, np.ndarray]],
                  runs: Sequence[Mapping[str, np.ndarray]], optimizations: bool, step: Any) -> float | None:
    """Worst output difference in LSB between ``runs`` (the candidate's outputs per sample) and ONNX Runtime run with
    graph ``optimizations`` on or off, the other way (its QDQ fusions run integer kernels); None when the run fails
    or no output is quantized."""
    try:
        other = OnnxRunner(cand_loaded, (), optimizations)
        worst = 0.0
        seen = False
        for sample, a in zip(samples, runs, strict=True):
            b = other.run(sample)
            for name in a:
                st = step(name)
                scale = st.broadcast(a[name].ndim) if st is not None else None
                if scale is None or a[name].shape != b[name].shape:
                    continue
                seen = True
                diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64)) / scale
                worst = max(worst, float(diff.max()))
        return worst if seen else None
    except UnusableInputError:
        return None
