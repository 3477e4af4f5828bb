"""Numeric parity against ONNX Runtime, per output and per layer, with errors in quantization steps (LSB).

``check_parity(reference, candidate)`` runs the same inputs through a reference (an ONNX model, or a torch module:
see :mod:`tiexport.parity.torch_reference`) and through the candidate ONNX model in ONNX Runtime, and compares
every output and, with ``per_layer=True``, every intermediate tensor the two share, in topological order. It
answers "which layer broke" (reference fact 6.4 of the shared TIDL notes: users cannot tell which layer of a QAT model
diverges in ONNX Runtime) by naming the first tensor that exceeds its tolerance.

The pass criterion and the metrics are :mod:`tiexport.parity.metrics`'s: a quantized tensor passes within
``max_lsb`` steps of its own quantization on >= 99.9 % of its elements (the reference model's quantization, the
candidate's where the reference has none), a float tensor within ``atol + rtol * |reference|``. The report passes
when every *output* passes; per-layer results are diagnostics (``first_divergence`` is the first tensor in
topological order over its tolerance, outputs included).

ONNX Runtime runs with graph optimizations disabled (``ORT_DISABLE_ALL``) unless ``ort_optimizations=True``: TI
recommends that setting for QDQ models (shared TIDL notes §4), and it keeps every Q/DQ node as written, so the
numbers are those of the graph itself rather than of ORT's fused kernels.

This module never imports torch at module level: comparing two ONNX models works without torch installed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tiexport import limits
from tiexport.context import ModelContext
from tiexport.errors import UnusableInputError, UsageError
from tiexport.onnx_io import as_model
from tiexport.parity.inputs import InputSpec, input_specs, load_inputs
from tiexport.parity.metrics import Accumulator, check_tolerances
from tiexport.parity.report import LayerResult, ParityReport, first_divergence
from tiexport.parity.runner import OnnxRunner, check_tensor_sizes, probe_candidates
from tiexport.parity.steps import Step, step_of
from tiexport.parity.torch_reference import run_torch_parity

__all__ = ["ProgressCallback", "check_parity", "is_torch_module"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


def is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)



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
    time_limit: float | None = limits.DEFAULT_TIME_LIMIT,
    local: bool = True,
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
    ``time_limit``: seconds the comparison may take (None or 0: no limit); past it, the ONNX Runtime run in
    progress is stopped and :class:`tiexport.limits.LimitExceeded` raised.
    ``local`` (torch reference): when an output fails end to end, compare again layer by layer with every mapped
    quantized activation fed from the reference (:class:`~tiexport.parity.report.LocalParity`); the report passes
    ("layer-local") when every layer and output is within the criterion that way. In a deep network a 1-LSB rounding
    difference (torch and ONNX Runtime sum in different orders) can grow to many LSB at the outputs; fed from the
    reference, each layer shows what it computes itself. ``local=False``: outputs end to end only.
    """
    with limits.time_limit(time_limit, "parity"):
        return _check_parity(reference, candidate, inputs, num_samples, seed, atol, rtol, max_lsb, per_layer,
                             ort_optimizations, progress=progress, candidate_session=candidate_session,
                             local=local)


def _check_parity(reference: Any, candidate: Any, inputs: Any, num_samples: int, seed: int, atol: float | None,
                  rtol: float | None, max_lsb: float, per_layer: bool, ort_optimizations: bool, *,
                  progress: ProgressCallback | None, candidate_session: Any, local: bool = True) -> ParityReport:
    criterion = check_tolerances(atol, rtol, max_lsb)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise UsageError(f"num_samples must be an integer, got {num_samples!r}")
    cand_loaded = as_model(candidate)
    cand_ctx = ModelContext(cand_loaded)
    report_kwargs = dict(candidate=cand_loaded.name, atol=criterion.atol, rtol=criterion.rtol,
                         max_lsb=criterion.max_lsb, per_layer=per_layer, ort_optimizations=ort_optimizations)
    if is_torch_module(reference):
        return run_torch_parity(reference, cand_loaded, cand_ctx, inputs=inputs, num_samples=int(num_samples),
                                seed=seed, criterion=criterion, per_layer=per_layer,
                                ort_optimizations=ort_optimizations, progress=progress, report_kwargs=report_kwargs,
                                candidate_session=candidate_session, local=local)
    ref_loaded = as_model(reference)
    ref_ctx = ModelContext(ref_loaded)
    specs = input_specs(ref_ctx)
    cand_specs = input_specs(cand_ctx)
    feed_names = _pair_inputs(specs, cand_specs, ref_loaded.name, cand_loaded.name)
    # a float16 candidate of a float32 reference gets the same samples, rounded to its own input type
    cand_dtypes = {s.name: s.dtype for s in cand_specs}
    samples = load_inputs(inputs, specs, ref_ctx, int(num_samples), seed)
    check_tensor_sizes(ref_ctx)
    check_tensor_sizes(cand_ctx)

    out_pairs = _pair_outputs([o.name for o in ref_loaded.model.graph.output],
                              [o.name for o in cand_loaded.model.graph.output], ref_loaded.name, cand_loaded.name)
    layer_tensors: list[str] = []
    if per_layer:
        cand_tensors = set(probe_candidates(cand_ctx))
        layer_tensors = [t for t in probe_candidates(ref_ctx) if t in cand_tensors]
    ref_run: OnnxRunner | None = OnnxRunner(ref_loaded, layer_tensors, ort_optimizations)
    ref_outputs: list[dict[str, np.ndarray]] | None = None
    if not layer_tensors:
        # One model's weights in memory at a time: the reference's outputs for every sample first (small), then
        # its session goes before the candidate runs (fix of a 1 GiB model: 2.28 GB peak with both live)
        ref_outputs = []
        for sample in samples:
            limits.check()
            ref_outputs.append(ref_run.run(sample))  # type: ignore[union-attr]
        ref_run = None  # freed here (reference count): its session and mapped weights go
    cand_run = OnnxRunner(cand_loaded, layer_tensors, ort_optimizations, session=candidate_session)

    def step(tensor_ref: str, tensor_cand: str) -> Step | None:
        return step_of(ref_ctx, tensor_ref) or step_of(cand_ctx, tensor_cand)

    out_acc = {c: Accumulator(step(r, c), criterion, len(samples)) for r, c in out_pairs}
    layer_acc: dict[str, Accumulator] = {t: Accumulator(step(t, t), criterion, len(samples)) for t in layer_tensors}
    skipped: dict[str, str] = {}
    not_float: set[str] = set()
    for i, sample in enumerate(samples):
        limits.check()
        ref_vals = ref_outputs[i] if ref_outputs is not None else ref_run.run(sample)  # type: ignore[union-attr]
        cand_vals = cand_run.run({feed_names[k]: _as_dtype(v, cand_dtypes.get(feed_names[k]))
                                  for k, v in sample.items()})
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
    layers = [LayerResult(t, *node_of(ref_ctx, t), layer_acc[t].result()) for t in layer_tensors if t not in skipped]
    first = first_divergence(layers, outputs, cand_ctx)
    notes = []
    mismatched = [t for t in skipped if t not in not_float]
    if mismatched:
        notes.append(f"{len(mismatched)} shared tensor(s) not compared (different shape or type): "
                     + ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
    return ParityReport(passed=all(m.passed for m in outputs.values()), outputs=outputs, first_divergence=first,
                        layers=layers, reference=ref_loaded.name, samples=len(samples), notes=notes,
                        **report_kwargs)  # type: ignore[arg-type]


def _as_dtype(value: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or value.dtype == dtype or value.dtype.kind != "f" or np.dtype(dtype).kind != "f":
        return value
    return value.astype(dtype)


def node_of(ctx: ModelContext, tensor: str) -> tuple[str, str]:
    node = ctx.producer_of(tensor)
    return (ctx.node_name(node), node.op_type) if node is not None else ("", "")



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

