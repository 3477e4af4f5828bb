"""ONNX Runtime for parity: sessions made one way everywhere, and a runner that exposes intermediate tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tiexport import limits
from tiexport.context import ModelContext
from tiexport.errors import UnusableInputError, first_line
from tiexport.onnx_io import LoadedModel, external_data_info, over_budget

__all__ = ["OnnxRunner", "forced_input_name", "ort_session", "probe_candidates"]

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})


def ort_session(source: str | bytes, *, optimizations: bool = False, external_folder: str | None = None) -> Any:
    """An ONNX Runtime CPU session for a model path or serialized model, made the way every parity run makes it.

    Raises what ``onnxruntime.InferenceSession`` raises; callers turn that into their own one-line error.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimizations
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 4  # failures come back as exceptions (one line); ORT's own log would add more
    # The default order runs every node whose inputs are ready first: all weight DequantizeLinear nodes of a QDQ
    # model before the first layer, holding every weight in float at once (1.4 GB for 256 MB of int8 weights);
    # priority order runs each where its layer needs it (385 MB). Same kernels, same numbers.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # Two sessions take turns: an idle one's spinning worker threads would steal the cores the busy one needs
    # (measured 2x slower on ResNet-50 with 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """An ONNX Runtime session over a model with ``probes`` (intermediate tensors) added as extra outputs.

    The probes are appended to a *serialized* copy of the model as a second protobuf message (protobuf merges
    concatenated messages, so repeated ``graph.output`` fields append): no ModelProto copy, weights serialized
    once. External data is read by ONNX Runtime from the model's folder. ``session``: one already made by
    :func:`ort_session` for this model without probes (``fix`` makes it for its load check), used as it is.
    ``forced``: tensor -> ONNX element type; a *forced run* (layer-local parity) feeds each such tensor's consumers
    from an extra input (:func:`forced_input_name`) and returns the tensor as computed by its own producer.
    """

    def __init__(self, loaded: LoadedModel, probes: Sequence[str] = (), optimizations: bool = False,
                 session: Any = None, forced: Mapping[str, int] | None = None) -> None:
        self.name = loaded.name
        self.output_names = [o.name for o in loaded.model.graph.output]
        declared = set(self.output_names)
        self.probes = [p for p in dict.fromkeys(probes) if p not in declared]
        self.forced = dict(forced or {})
        self.probes += [t for t in self.forced if t not in declared and t not in self.probes]
        if session is not None and not self.probes and not self.forced:
            self.session = session
            self.input_names = [i.name for i in session.get_inputs()]
            return
        source: str | bytes
        has_external = bool(external_data_info(loaded.model))
        folder = loaded.base_dir if has_external and loaded.base_dir is not None else None
        path = Path(loaded.name)
        if self.forced:
            source = _forced_bytes(loaded.model, self.forced, self.probes)
        elif not self.probes and loaded.base_dir is not None and path.is_file():
            source = str(path)
        else:
            try:
                data = loaded.model.SerializeToString()
            except Exception as exc:  # > 2 GB in memory
                raise UnusableInputError(f"{loaded.name}: cannot serialize for ONNX Runtime: {first_line(exc)}"
                                         ) from None
            if self.probes:
                extra = onnx.ModelProto()
                extra.graph.output.extend(onnx.ValueInfoProto(name=p) for p in self.probes)
                data += extra.SerializeToString()
            source = data
        try:
            self.session = ort_session(source, optimizations=optimizations, external_folder=folder)
        except Exception as exc:
            raise UnusableInputError(f"{loaded.name}: ONNX Runtime cannot load the model: {first_line(exc)}"
                                     ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        names = self.output_names + self.probes
        options = ort.RunOptions()
        options.log_severity_level = 4
        try:
            # the time limit or a SIGTERM stops the run inside ONNX Runtime (a Loop of 2**62 trips never returns)
            with limits.cancellable(lambda: setattr(options, "terminate", True)):
                values = self.session.run(names, dict(feed), options)
        except Exception as exc:
            limits.check()
            raise UnusableInputError(f"{self.name}: ONNX Runtime failed on the inputs: {first_line(exc)}") from None
        return dict(zip(names, (np.asarray(v) for v in values), strict=True))


def forced_input_name(tensor: str) -> str:
    """The graph input that replaces ``tensor`` for its consumers in a forced run (see :class:`OnnxRunner`)."""
    return f"{tensor}::reference"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _forced_bytes(model: onnx.ModelProto, forced: Mapping[str, int], probes: Sequence[str]) -> bytes:
    """``model`` serialized with every consumer of a ``forced`` tensor reading a new graph input instead
    (:func:`forced_input_name`, of the element type given) and the forced tensors and ``probes`` as extra outputs.

    The tensor's producer still runs: its output, computed from forced inputs upstream, is what a layer-local
    comparison checks. Nodes are copied, initializers are not: the graph is serialized without them and each
    initializer is appended as its own ``graph { initializer { ... } }`` message (protobuf merges repeated fields of
    concatenated messages), one tensor in memory at a time beside the result. Subgraph bodies are left as they are.
    """
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(shell, field.name).extend(value)
        elif field.message_type is not None:
            getattr(shell, field.name).CopyFrom(value)
        else:
            setattr(shell, field.name, value)
    g = model.graph
    sg = shell.graph
    sg.name = g.name
    sg.doc_string = g.doc_string
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    sg.sparse_initializer.extend(g.sparse_initializer)
    for node in g.node:
        copy = sg.node.add()
        copy.CopyFrom(node)
        for k, name in enumerate(copy.input):
            if name in forced:
                copy.input[k] = forced_input_name(name)
    declared = {o.name for o in g.output}
    for tensor, elem_type in forced.items():
        sg.input.append(onnx.helper.make_tensor_value_info(forced_input_name(tensor), elem_type, None))
        if tensor not in declared:
            sg.output.append(onnx.ValueInfoProto(name=tensor))
            declared.add(tensor)
    sg.output.extend(onnx.ValueInfoProto(name=p) for p in probes if p not in declared)
    parts = [shell.SerializeToString()]
    for init in g.initializer:
        tensor = init.SerializeToString()
        inner = b"\x2a" + _varint(len(tensor)) + tensor  # GraphProto.initializer = field 5, length-delimited
        parts.append(b"\x3a" + _varint(len(inner)) + inner)  # ModelProto.graph = field 7, length-delimited
    return b"".join(parts)


def check_tensor_sizes(ctx: ModelContext) -> None:
    """Refuse to run a model whose shape inference gives a tensor larger than the memory budget
    (:func:`tiexport.limits.memory_budget`): a ``Range(0, 2**40)`` would have ONNX Runtime allocate it, and one a
    little over the machine's memory is not refused by the allocator but kills the process when it is written."""
    budget = limits.memory_budget()
    inputs = {vi.name for vi in ctx.graph_inputs}  # the samples' size is the input drawing's business
    for tensor, t in ctx.inferred_types.items():
        if tensor in inputs or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        dims = t.tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            continue
        over = over_budget([d.dim_value for d in dims], t.tensor_type.elem_type, budget)
        if over:
            raise UnusableInputError(f"{ctx.name}: tensor {tensor!r} would hold {over} by shape inference; ONNX "
                                     "Runtime is not run on it")


def _dynamic_tensors(ctx: ModelContext) -> list[str]:
    """Outputs of top-level nodes that depend on a graph input, in topological (graph) order."""
    live = {vi.name for vi in ctx.graph_inputs}
    order = []
    for node in ctx.nodes:
        if any(i in live for i in node.input if i):
            for out in node.output:
                if out and out not in live:
                    live.add(out)
                    order.append(out)
    return order


def probe_candidates(ctx: ModelContext) -> list[str]:
    """Tensors worth comparing per layer: dynamic, float (or of unknown type), not the integer codes of a Q."""
    keep = []
    for t in _dynamic_tensors(ctx):
        producer = ctx.producer_of(t)
        if producer is not None and producer.op_type == "QuantizeLinear":
            continue  # compared through the DQ that reads them: zero points may differ between the two models
        et = ctx.elem_type(t)
        if et is not None and et not in _FLOAT_TYPES:
            continue
        keep.append(t)
    return keep

