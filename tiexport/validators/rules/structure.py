"""Structural rules: the model must be a valid ONNX graph, with an opset and IR version the ONNX / ONNX Runtime of
the TIDL release reads, and static shapes everywhere.

Sources (``tiexport.tidl_spec.sources``): the ONNX IR specification; edgeai-tidl-tools
``docs/supported_ops_rts_versions.md`` "Supported model formats & operator versions" at each release branch (ONNX
1.13 / ONNX Runtime 1.14, opset 18 for 9.2 and 10.0; ONNX 1.14 / ONNX Runtime 1.15, opset 19 for 10.1 and 11.0);
TI's compile examples, which run ONNX shape inference on every model (``examples/osrt_python/common_utils.py``), and
the EltWise row's "requires input dimensions of that layer to be present ... please run shape inference".
"""

from __future__ import annotations

from collections.abc import Iterator

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import get_spec
from tiexport.tidl_spec.sources import ONNX_IR_SPEC, OSRT_INFER_SHAPES
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule

__all__ = ["CheckerRule", "GraphIntegrityRule", "InputShapeRule", "OpsetRule", "ShapeInferenceRule"]


class CheckerRule(Rule):
    """TIDL001: the model fails ``onnx.checker``.

    Why: TIDL's import (and ONNX Runtime) parse the model with the ONNX library; an invalid model is rejected before
    any TIDL rule matters. Fix: re-export, or repair the node the checker names.
    """

    id = "TIDL001"
    title = "model fails the ONNX checker"
    category = "structure"
    sources = (ONNX_IR_SPEC, get_spec().versions_source)
    device_independent = True
    needs_qdq = False
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        if ctx.checker_error:
            yield self.finding(ctx, None, f"onnx.checker: {ctx.checker_error[:400]}",
                               "re-export the model or repair the node the checker names")


class GraphIntegrityRule(Rule):
    """TIDL002: a node reads a tensor nothing produces, a tensor is produced twice, or the graph has a cycle.

    Why: an ONNX graph must be a DAG in topological order with single assignment (ONNX IR spec); TIDL's importer
    walks it in order. Fix: the exporter or a hand edit broke the graph; re-export.
    """

    id = "TIDL002"
    title = "graph is not a well-formed DAG"
    category = "structure"
    sources = (ONNX_IR_SPEC,)
    device_independent = True
    needs_qdq = False
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        counts: dict[str, int] = {}
        for t in ctx.graph.initializer:
            counts[t.name] = counts.get(t.name, 0) + 1
        for name, n in counts.items():
            if n > 1:  # ONNX Runtime uses the last, graph tools (and TIDL's import, through ONNX) may use the first
                yield self.finding(ctx, None, f"initializer {name!r} is defined {n} times; tools disagree on which "
                                   "one a node reads", "keep one initializer per name; re-export the model",
                                   op_type="initializer", node_name=name)
        available = {vi.name for vi in ctx.graph.input} | set(ctx.initializers)
        produced_by: dict[str, str] = {}
        for node in ctx.nodes:
            for out in node.output:
                if not out:
                    continue
                if out in produced_by or out in available:
                    first = produced_by.get(out, "a graph input or initializer")
                    yield self.finding(ctx, node, f"tensor {out!r} is also produced by {first}",
                                       "every tensor must have exactly one producer; rename one of them")
                produced_by.setdefault(out, ctx.node_name(node))
        for node in ctx.nodes:
            names = [node.name, *node.input, *node.output]
            if any(isinstance(n, bytes) for n in names):
                yield self.finding(ctx, node, "node or tensor name is not valid UTF-8",
                                   "ONNX names must be UTF-8 strings; re-export the model")
        all_outputs = set(produced_by)
        defined = set(available)
        for node in ctx.nodes:
            for inp in node.input:
                if not inp or inp in defined:
                    continue
                if inp in all_outputs:
                    yield self.finding(ctx, node, f"input {inp!r} is used before it is produced (cycle or unsorted)",
                                       "the graph must be acyclic and topologically sorted; re-export it")
                else:
                    yield self.finding(ctx, node, f"input {inp!r} is not produced by any node, input or initializer",
                                       "re-export the model; a tensor it needs is missing")
            defined.update(o for o in node.output if o)
        for out in ctx.graph.output:
            if out.name not in defined:
                yield self.finding(ctx, None, f"graph output {out.name!r} is not produced by any node",
                                   "remove the output or re-export", op_type="output")
        graph_input_names = {vi.name for vi in ctx.graph.input}
        for name in ctx.initializers:
            if name in graph_input_names:
                yield self.finding(
                    ctx, None,
                    f"initializer {name!r} is also a graph input, so a runtime may override it with fed data",
                    "re-export without keep_initializers_as_inputs (TIDL treats it as a variable input)",
                    severity="warning", op_type="initializer", node_name=name,
                )


class OpsetRule(Rule):
    """TIDL003: the ai.onnx opset or IR version is outside what TIDL's parser reads.

    Why: each TIDL release ships an ONNX and ONNX Runtime of its own: ONNX 1.13 / ONNX Runtime 1.14 (opset 18, IR 8)
    up to 10.0, ONNX 1.14 / ONNX Runtime 1.15 (opset 19, IR 9) from 10.1 ("Supported model formats & operator
    versions" of the release's operator doc); per-axis QuantizeLinear/DequantizeLinear need opset 13 (ONNX operator
    specification). TI's own exports use opset 17 (v2) or 18 (v3). Fix: re-export with ``opset_version=17``.
    A custom operator domain a node uses is tiexport advice (such nodes are also TIDL040 findings); a domain the
    model imports but no node uses (ONNX Runtime's ``quant_pre_process`` adds six) is not reported.
    """

    id = "TIDL003"
    title = "opset or IR version outside TIDL's supported range"
    category = "opset"
    sources = (get_spec().versions_source,)
    advice_parts = "custom operator domains used by nodes"
    device_independent = True
    needs_qdq = False
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        spec = device.spec
        src = spec.versions_source
        hint = "re-export with opset_version=17 (what TI's v2 exports use)"
        if ctx.opset == 0:
            yield self.finding(ctx, None, "model imports no ai.onnx opset", hint, source=src)
        elif ctx.opset > spec.max_opset:
            yield self.finding(ctx, None, f"opset {ctx.opset} is newer than TIDL {spec.sdk}'s ONNX Runtime reads "
                               f"(up to {spec.max_opset})", hint, source=src)
        elif ctx.opset < spec.min_opset and any(qp.per_channel for _, qp in ctx.quantizers()):
            # TI's QAT v1 flow exports opset 11 (a float graph with Clip nodes); only per-axis Q/DQ needs 13
            yield self.finding(ctx, None, f"opset {ctx.opset} is older than {spec.min_opset}, the first with "
                               "per-axis QuantizeLinear/DequantizeLinear, which this model uses", hint,
                               source="onnx/onnx@main:docs/Operators.md#QuantizeLinear (since version 13: axis)")
        if ctx.model.ir_version > spec.max_ir:
            yield self.finding(ctx, None, f"IR version {ctx.model.ir_version} is newer than TIDL {spec.sdk}'s ONNX "
                               f"reads (up to {spec.max_ir})", "tiexport fix writes the oldest IR the opsets allow",
                               fixable=True, source=src)
        # Only domains nodes use: ONNX Runtime's quant_pre_process imports six (ai.onnx.preview, com.microsoft.nchwc,
        # ...) that no node of its output uses, and an import alone changes nothing for TIDL or ONNX Runtime.
        used = {n.domain for n in ctx.nodes} | {n.domain for f in ctx.model.functions for n in f.node}
        for imp in ctx.model.opset_import:
            if imp.domain not in ("", "ai.onnx", "com.microsoft", "ai.onnx.ml") and imp.domain in used:
                yield self.finding(ctx, None, f"custom operator domain {imp.domain!r} (version {imp.version})",
                                   "custom-domain nodes run on Arm at best; replace them with standard ops",
                                   severity="warning", advice=True)



class InputShapeRule(Rule):
    """TIDL004: a graph input has an unknown, symbolic or non-positive dimension.

    Why: TIDL needs every tensor's dimensions: TI's compile examples run ONNX shape inference on the model first, and
    the operator table asks for it ("requires input dimensions of that layer to be present as part of the network,
    please run shape inference"); a symbolic input dimension leaves every shape after it unknown (users report
    "All the Input Tensor Dimensions has to be greater then Zero" from TIDL's import). Fix: ``tiexport fix
    --input-shape NAME:1x3x224x224``; a symbolic batch dimension alone is pinned to 1 automatically.
    """

    id = "TIDL004"
    title = "graph input with a dynamic or non-positive dimension"
    category = "static_shape"
    sources = (OSRT_INFER_SHAPES, get_spec().op_source("Add"))
    device_independent = True
    needs_qdq = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        for vi in ctx.graph_inputs:
            t = vi.type
            if not t.HasField("tensor_type"):
                yield self.finding(ctx, None, f"input {vi.name!r} is not a tensor", "TIDL takes tensor inputs only",
                                   op_type="input", node_name=vi.name)
                continue
            if not t.tensor_type.HasField("shape"):
                yield self.finding(ctx, None, f"input {vi.name!r} has no shape",
                                   f"tiexport fix --input-shape {vi.name}:1x3x224x224 (your shape)",
                                   op_type="input", node_name=vi.name)
                continue
            dims = t.tensor_type.shape.dim
            bad = [i for i, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
            if not bad:
                continue
            shown = "x".join(d.dim_param or "?" if not d.HasField("dim_value") else str(d.dim_value) for d in dims)
            batch_only = bad == [0] and not dims[0].HasField("dim_value") and len(dims) > 1
            yield self.finding(
                ctx, None,
                f"input {vi.name!r} has shape [{shown}]: dimension(s) {', '.join(map(str, bad))} not fixed and > 0",
                "tiexport fix pins a dynamic batch to 1" if batch_only
                else f"tiexport fix --input-shape {vi.name}:<dims, e.g. 1x3x224x224>",
                op_type="input", node_name=vi.name, fixable=batch_only,
            )


class ShapeInferenceRule(Rule):
    """TIDL005: ONNX shape inference cannot give a tensor a complete static shape.

    Why: TIDL resolves every tensor's shape with ONNX shape inference, which TI's compile examples run before
    compiling (same sources as TIDL004); a Reshape shape computed at run time is also outside the Reshape row
    ("Variable shape is not supported"). Fix: static input shapes first; then replace shape-computing subgraphs
    (Shape -> Gather -> Concat -> Reshape) with constant shapes (export with static shapes / constant folding).
    """

    id = "TIDL005"
    title = "tensor shape not inferable"
    category = "static_shape"
    sources = InputShapeRule.sources
    device_independent = True
    needs_qdq = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        if ctx.shape_inference_error:
            yield self.finding(ctx, None, f"ONNX shape inference fails: {ctx.shape_inference_error[:300]}",
                               "repair the node it names; TIDL runs the same inference")
            return
        inputs_static = all(ctx.static_shape(vi.name) is not None for vi in ctx.graph_inputs)
        if not inputs_static:
            return  # TIDL004 says why; every downstream tensor would repeat it
        unknown: set[str] = set()
        for node in ctx.nodes:
            # Report where static shapes stop, not every tensor downstream of it.
            inherited = any(i in unknown for i in node.input if i)
            for out in node.output:
                # a constant's shape is its value's (an empty Resize roi of shape [0] included: TorchScript writes
                # one for every opset-11 Resize, as in TI's QAT v1 exports)
                if out and not ctx.is_const(out) and ctx.static_shape(out) is None:
                    unknown.add(out)
                    if inherited:
                        continue
                    yield self.finding(ctx, node, f"output {out!r} has no static shape after shape inference "
                                       f"(got {ctx.shape(out)})",
                                       "make the shape computation constant (e.g. a constant Reshape shape)")
                    break
