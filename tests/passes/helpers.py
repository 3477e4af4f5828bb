"""Shared helpers of the pass tests: apply passes to a ModelProto, run it in ONNX Runtime, look at the result."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from tiexport.passes.base import Pass, PassResult

__all__ = ["apply", "assert_valid", "const", "node", "op_types", "outputs_of", "random_feed", "run_ort"]


def apply(model: onnx.ModelProto, *passes: Pass) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the passes in order on a copy of ``model``; return the exported result and each pass's result."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = gs.import_onnx(copy)
    results = [p.call(graph) for p in passes]
    out = gs.export_onnx(graph, do_type_check=False)
    return out, results


def assert_valid(model: onnx.ModelProto) -> None:
    """onnx.checker (full: with strict shape inference) and an ONNX Runtime session both accept the model."""
    onnx.checker.check_model(model, full_check=True)
    _session(model)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feed)), strict=True))


def random_feed(model: onnx.ModelProto, seed: int = 0, lo: float = -1.0, hi: float = 1.0,
                batches: int = 1) -> dict[str, np.ndarray]:
    """Uniform float data for every (static-shaped) graph input."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else batches for d in vi.type.tensor_type.shape.dim]
        feed[vi.name] = rng.uniform(lo, hi, size=shape).astype(np.float32)
    return feed


def outputs_of(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return list(run_ort(model, feed).values())


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def const(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)
