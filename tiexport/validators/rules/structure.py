"""Structural rules: the model must be a valid ONNX graph, with an opset and IR version TIDL's parser reads,
and static shapes everywhere (tidl.md §2 "Static shapes are required", §3 "ONNX validated around ONNX 1.14 /
ORT 1.15 (opset up to 19, IR 8)")."""

from __future__ import annotations

from collections.abc import Iterator

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
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
    device_independent = True
    needs_qdq = False
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
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

    Why: TIDL is validated with ONNX 1.14 / ONNX Runtime 1.15: opset up to 19, IR up to 9 (tidl.md §3 "Other compile
    limits"); QDQ per-channel quantization needs opset 13 or newer. TI's own exports use opset 17 (v2) or 18 (v3).
    Fix: re-export with ``opset_version=17``.
    """

    id = "TIDL003"
    title = "opset or IR version outside TIDL's supported range"
    category = "opset"
    device_independent = True
    needs_qdq = False
    needs_accelerator = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        spec = device.spec
        hint = "re-export with opset_version=17 (what TI's v2 exports use)"
        if ctx.opset == 0:
            yield self.finding(ctx, None, "model imports no ai.onnx opset", hint)
        elif ctx.opset > spec.max_opset:
            yield self.finding(ctx, None, f"opset {ctx.opset} is newer than TIDL supports (up to {spec.max_opset})",
                               hint)
        elif ctx.opset < spec.min_opset:
            yield self.finding(ctx, None, f"opset {ctx.opset} is older than {spec.min_opset}, the first with "
                               "per-axis QuantizeLinear/DequantizeLinear", hint)
        if ctx.model.ir_version > spec.max_ir:
            yield self.finding(ctx, None, f"IR version {ctx.model.ir_version} is newer than TIDL's ONNX reads "
                               f"(up to {spec.max_ir})", "re-export with opset 17 or set model.ir_version = 8",
                               fixable=True)
        for imp in ctx.model.opset_import:
            if imp.domain not in ("", "ai.onnx", "com.microsoft", "ai.onnx.ml"):
                yield self.finding(ctx, None, f"custom operator domain {imp.domain!r} (version {imp.version})",
                                   "custom-domain nodes run on Arm at best; replace them with standard ops",
                                   severity="warning")


class InputShapeRule(Rule):
    """TIDL004: a graph input has an unknown, symbolic or non-positive dimension.

    Why: TIDL needs every input dimension > 0 (tidl.md §2 "Static shapes", §6.1: "All the Input Tensor Dimensions
    has to be greater then Zero"). Fix: ``tiexport fix --input-shape NAME:1x3x224x224``; a symbolic batch dimension
    alone is pinned to 1 automatically.
    """

    id = "TIDL004"
    title = "graph input with a dynamic or non-positive dimension"
    category = "static_shape"
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

    Why: TIDL resolves every tensor's shape with ONNX shape inference (tidl.md §2 "shapes resolvable by ONNX shape
    inference"). Fix: static input shapes first; then replace shape-computing subgraphs (Shape -> Gather -> Concat ->
    Reshape) with constant shapes (export with static shapes / constant folding).
    """

    id = "TIDL005"
    title = "tensor shape not inferable"
    category = "static_shape"
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
                if out and ctx.static_shape(out) is None:
                    unknown.add(out)
                    if inherited:
                        continue
                    yield self.finding(ctx, node, f"output {out!r} has no static shape after shape inference "
                                       f"(got {ctx.shape(out)})",
                                       "make the shape computation constant (e.g. a constant Reshape shape)")
                    break
