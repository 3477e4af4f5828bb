"""ReplaceReduceMeanWithGlobalPoolPass: a spatial ReduceMean keeping its dims -> GlobalAveragePool, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.export_helpers import model
from tests.passes.helpers import apply, assert_valid, outputs_of
from tiexport.passes.reduce_mean import ReplaceReduceMeanWithGlobalPoolPass


def _reduce_mean_model(keepdims: int = 1, axes: tuple[int, ...] = (-1, -2)) -> onnx.ModelProto:
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)]
    out = [1 if i in [a % 4 for a in axes] else d for i, d in enumerate([1, 2, 4, 4])] if keepdims else [1, 2]
    return model(nodes, {"x": [1, 2, 4, 4]}, {"y": out}, {"axes": np.array(axes, np.int64)}, opset=18, markers=False)


def test_spatial_reduce_mean_becomes_global_average_pool_exactly() -> None:
    before = _reduce_mean_model()
    x = np.random.default_rng(2).standard_normal((1, 2, 4, 4)).astype(np.float32)
    out, results = apply(before, ReplaceReduceMeanWithGlobalPoolPass(), ReplaceReduceMeanWithGlobalPoolPass())
    assert [n.op_type for n in out.graph.node] == ["GlobalAveragePool"]
    assert results[0].changes == 1 and not results[1].modified
    assert_valid(out)
    np.testing.assert_allclose(outputs_of(out, {"x": x})[0], outputs_of(before, {"x": x})[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("keepdims", "axes"), [(0, (-1, -2)), (1, (2,)), (1, (1, 2, 3))])
def test_other_reduce_means_are_left_alone(keepdims: int, axes: tuple[int, ...]) -> None:
    _, results = apply(_reduce_mean_model(keepdims, axes), ReplaceReduceMeanWithGlobalPoolPass())
    assert not results[0].modified
