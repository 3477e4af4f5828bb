"""The parity report: per output and per layer metrics, the first divergence, and its text and JSON forms."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiexport.context import ModelContext
from tiexport.parity.metrics import DEFAULT_ATOL, DEFAULT_RTOL, LOCAL_MIN_EXACT, MIN_FRACTION, TensorMetrics
from tiexport.terminal import paint

__all__ = ["LayerResult", "LocalParity", "ParityReport", "divergence", "first_divergence", "locally_passed"]

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
class LocalParity:
    """Layer-local parity: the candidate run with every mapped quantized activation fed from the reference.

    Each compared tensor is then what the candidate computes from the reference's own inputs to that layer, so a
    1-LSB rounding difference in one layer (float summation order differs between torch's and ONNX Runtime's
    kernels) cannot grow through the layers after it. ``passed``: every layer and output within the criterion.
    """

    passed: bool
    layers: list[LayerResult]
    outputs: dict[str, TensorMetrics]
    forced: int
    """Quantized activations fed from the reference."""
    grid_mismatches: list[str] = field(default_factory=list)
    """Points whose ONNX quantization (scale, or clipping range from the zero point) is not the reference's: the
    candidate computes on another grid there, whatever its errors measure; each one fails the comparison."""
    ort_self_lsb: float | None = None
    """Worst output difference, in LSB, between ONNX Runtime with and without its graph optimizations on the same
    candidate and inputs: how much rounding differences alone move this model's outputs (None: not measured)."""

    @property
    def worst(self) -> tuple[str, TensorMetrics] | None:
        items = [(layer.module or layer.tensor, layer.metrics) for layer in self.layers] + list(self.outputs.items())
        return max(items, key=lambda kv: (not locally_passed(kv[1]), round(kv[1].max_lsb or 0.0),
                                          -(kv[1].exact if kv[1].exact is not None else 1.0)), default=None)

    def summary(self) -> str:
        over = sum(1 for layer in self.layers if not locally_passed(layer.metrics))
        over += sum(1 for m in self.outputs.values() if not locally_passed(m))
        text = (f"{len(self.layers)} layer(s) and {len(self.outputs)} output(s) from the reference's inputs "
                f"({self.forced} activation(s) fed): {over} over tolerance")
        if self.grid_mismatches:
            text += f", {len(self.grid_mismatches)} quantized differently ({self.grid_mismatches[0]})"
        worst = self.worst
        if worst is not None:
            exact = f", {100 * worst[1].exact:.3f}% exact" if worst[1].exact is not None else ""
            text += f"; worst {worst[0]}: max {worst[1].max_lsb or 0.0:.3g} LSB{exact}"
        if self.ort_self_lsb is not None:
            text += (f"; ONNX Runtime with its graph optimizations differs from its own unoptimized run by "
                     f"{self.ort_self_lsb:.3g} LSB on these inputs")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "forced": self.forced, "ort_self_lsb": self.ort_self_lsb,
                "grid_mismatches": list(self.grid_mismatches),
                "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
                "layers": [layer.to_dict() for layer in self.layers]}


@dataclass
class ParityReport:
    """Result of :func:`check_parity`. ``passed`` is True when every output passes its criterion end to end, or,
    when that fails, every layer passes it from the reference's inputs (``local``, torch reference only)."""

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
    local: LocalParity | None = None
    """Layer-local parity, run when the outputs fail end to end (see :class:`LocalParity`)."""

    @property
    def end_to_end(self) -> bool:
        """Every output within the criterion when the candidate runs on its own."""
        return all(m.passed for m in self.outputs.values())

    @property
    def mode(self) -> str:
        """'end-to-end' (outputs pass as run), 'layer-local' (they do not, every layer does) or 'failed'."""
        if self.end_to_end:
            return "end-to-end"
        return "layer-local" if self.passed else "failed"

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
        verdict = "PASSED layer by layer" if self.mode == "layer-local" else ("PASSED" if self.passed else "FAILED")
        parts = [f"{verdict} ({len(self.outputs)} output(s), {self.samples} sample(s))"]
        if worst is not None:
            parts.append(f"worst {worst[0]}: {worst[1].summary()}")
        if self.local is not None:
            parts.append(f"layer-local: {self.local.summary()}")
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
            "mode": self.mode,
            "reference": self.reference,
            "candidate": self.candidate,
            "samples": self.samples,
            "criterion": self.criterion(),
            "ort_optimizations": self.ort_optimizations,
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "first_divergence": fd,
            "layers": [layer.to_dict() for layer in self.layers],
            "local": self.local.to_dict() if self.local is not None else None,
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self, colour: bool = False, max_layers: int = 60) -> str:
        """Human-readable report (ANSI colours when ``colour``; the CLI enables them on a TTY only)."""
        lines = [paint(f"parity: {self.candidate} vs {self.reference}", "bold", colour),
                 f"  {self.samples} sample(s), ONNX Runtime optimizations {'on' if self.ort_optimizations else 'off'}"]
        crit = self.criterion()
        for key in ("quantized", "float", "all"):
            if key in crit:
                lines.append(f"  criterion ({key}): {crit[key]}")
        lines.append("  outputs:")
        for name, m in self.outputs.items():
            tag = paint("PASS", "ok", colour) if m.passed else paint("FAIL", "error", colour)
            lines.append(f"    {tag} {name}: {m.summary()}")
        if self.per_layer:
            over = sum(1 for layer in self.layers if not layer.metrics.passed)
            lines.append(f"  layers: {len(self.layers)} compared, {over} over tolerance")
            shown = self.layers if len(self.layers) <= max_layers else [x for x in self.layers if not x.metrics.passed]
            for layer in shown[:max_layers]:
                tag = "ok  " if layer.metrics.passed else paint("OVER", "warning", colour)
                mod = f" [{layer.module}]" if layer.module else ""
                lines.append(f"    {tag} {layer.tensor} ({layer.op_type} {layer.node}){mod}: {layer.metrics.summary()}")
            if len(shown) > max_layers:
                lines.append(f"    ... {len(shown) - max_layers} more (see --format json)")
        if self.first_divergence is not None:
            fd = self.first_divergence
            m = fd["metrics"]
            mod = f", module {fd['module']}" if fd.get("module") else ""
            lines.append(paint(f"  first divergence: {fd['tensor']} (node {fd['node']}, {fd['op_type']}{mod})",
                                "warning", colour))
            lines.append(f"    {m.summary() if isinstance(m, TensorMetrics) else m}")
        if self.local is not None:
            lines.append("  layer by layer (every quantized activation fed from the reference):")
            lines.append(f"    {self.local.summary()}")
            local_over = [x for x in self.local.layers if not locally_passed(x.metrics)]
            for layer in local_over[:max_layers]:
                mod = f" [{layer.module}]" if layer.module else ""
                lines.append(f"    {paint('OVER', 'warning', colour)} {layer.tensor} ({layer.op_type} {layer.node})"
                             f"{mod}: {_local_summary(layer.metrics)}")
            for mismatch in self.local.grid_mismatches[:max_layers]:
                lines.append(f"    {paint('OVER', 'warning', colour)} quantized differently: {mismatch}")
            for name, om in self.local.outputs.items():
                if not locally_passed(om):
                    lines.append(f"    {paint('OVER', 'warning', colour)} output {name}: {_local_summary(om)}")
            if self.local.passed:
                lines.append("    every layer computes what the reference computes from the same inputs; the outputs "
                             "differ end to end because 1-LSB rounding differences (float summation order) grow "
                             "through the layers after them")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.mode == "layer-local":
            verdict = paint("PASSED layer by layer", "ok", colour)
        else:
            verdict = paint("PASSED", "ok", colour) if self.passed else paint("FAILED", "error", colour)
        lines.append(f"  verdict: {verdict}")
        return "\n".join(lines) + "\n"



def locally_passed(m: TensorMetrics) -> bool:
    """The layer-local criterion: the usual one, and exactly the reference's value on >= LOCAL_MIN_EXACT of the
    elements of a quantized tensor."""
    return m.passed and (m.exact is None or m.exact >= LOCAL_MIN_EXACT)


def _local_summary(m: TensorMetrics) -> str:
    exact = f", exact {100 * m.exact:.2f}% (needs {100 * LOCAL_MIN_EXACT:g}%)" if m.exact is not None else ""
    return m.summary() + exact


def divergence(tensor: str, ctx: ModelContext | None, metrics: TensorMetrics,
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



def first_divergence(layers: Sequence[LayerResult], outputs: Mapping[str, TensorMetrics],
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
            return divergence(name, out_ctx, m)
    return None
