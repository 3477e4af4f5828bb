"""The export pipeline as tiexport.export runs it: an exporter's output with markers, Identity nodes and opset 18
-> a QDQ model at opset 17, IR 8, that passes the full checker and computes what the input computed."""

from __future__ import annotations

import numpy as np
from onnx import helper

from tests.passes.export_helpers import fake_quant, marker, model
from tests.passes.helpers import assert_valid, outputs_of
from tiexport.passes import apply_passes
from tiexport.passes.expand_markers import ExpandQdqMarkersPass
from tiexport.passes.pipelines import export_pipeline


def test_export_pipeline_gives_a_clean_model_at_the_requested_opset() -> None:
    w = np.array([[0.25, -0.5, 0.75]], dtype=np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["x_id"]),
             marker("x_id", "xq", "act", [0.1], [128]),
             marker("w", "wq", "fc.weight_fake_quant", [0.01], [0], axis=0, qmin=-128, qmax=127),
             helper.make_node("Mul", ["xq", "wq"], ["m"]),
             helper.make_node("ReduceMean", ["m", "axes"], ["r"], keepdims=1),
             helper.make_node("Identity", ["r"], ["y"])]
    before = model(nodes, {"x": [1, 1, 2, 3]}, {"y": [1, 1, 1, 1]}, {"w": w, "axes": np.array([2, 3], np.int64)},
                   opset=18)
    passes = export_pipeline(17)
    out, result = apply_passes(before, passes)
    assert result.converged
    assert [n.op_type for n in out.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Mul",
                                                   "GlobalAveragePool"]
    assert out.ir_version == 8 and [(o.domain, o.version) for o in out.opset_import] == [("", 17)]
    assert out.graph.output[0].name == "y"
    assert_valid(out)
    x = np.random.default_rng(0).uniform(-12, 12, size=(1, 1, 2, 3)).astype(np.float32)
    expected = (fake_quant(x, np.float32(0.1), 128, 0, 255) * fake_quant(w, np.float32(0.01), 0, -128, 127)).mean(
        axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(outputs_of(out, {"x": x})[0], expected, rtol=1e-6)
    sites = next(p for p in passes if isinstance(p, ExpandQdqMarkersPass)).sites
    assert [s.module for s in sites] == ["act", "fc.weight_fake_quant"]
