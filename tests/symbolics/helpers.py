"""Helpers for the export tests: quantize the fixture models the ways users do, run the torch reference with frozen
observers, run the ONNX model in ONNX Runtime, and compare in units of the output's quantization step."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from fixtures.torch_models import SmallCNN, TransformerBlock, _trained_ish, calibration_batches

CNN_SHAPE = (1, 3, 32, 32)
TRANSFORMER_SHAPE = (1, 8, 32)
SHAPES = {"cnn": CNN_SHAPE, "transformer": TRANSFORMER_SHAPE}


def float_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A seeded fixture model in eval mode (the CNN with non-trivial batch-norm statistics)."""
    torch.manual_seed(seed)
    if name == "cnn":
        return _trained_ish(SmallCNN(), CNN_SHAPE, seed)
    return TransformerBlock().eval()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def torch_default_fx(name: str, kind: str, backend: str = "x86", batches: int = 2) -> torch.nn.Module:
    """torch's own recipes: ``fx_ptq`` = prepare_fx with the default qconfig mapping, calibrate, convert_fx;
    ``fx_qat`` = prepare_qat_fx with the default QAT mapping (fused moving-average fake-quant), a few training
    forwards, eval (the fake-quant model users export)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

    shape = SHAPES[name]
    model = float_model(name)
    example = (torch.rand(shape),)
    with quiet(), torch.no_grad():
        if kind == "fx_ptq":
            prepared = prepare_fx(model, get_default_qconfig_mapping(backend), example)
            for b in calibration_batches(shape, batches, seed=11):
                prepared(b)
            return convert_fx(prepared)
        prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping(backend), example)
        for b in calibration_batches(shape, batches, seed=11):
            prepared(b)
        return prepared.eval()


def wrapped(name: str, kind: str, batches: int = 2, convert: bool = False) -> torch.nn.Module:
    """tiexport's wrappers: ``ptc`` = PTCFxModule calibration, ``qat`` = QATFxModule with a backward per batch;
    returns the wrapped GraphModule (``.module``), converted when asked."""
    from tiexport.wrappers import PTCFxModule, QATFxModule

    shape = SHAPES[name]
    model = float_model(name)
    example = torch.rand(shape)
    with quiet():
        if kind == "ptc":
            w = PTCFxModule(model, example_inputs=example)
        else:
            w = QATFxModule(model, total_epochs=1, example_inputs=example)
        w.train()
        for b in calibration_batches(shape, batches, seed=11):
            out = w(b)
            if kind == "qat":
                out.float().sum().backward()
        w.eval()
        if convert:
            w.convert()
    return w.module


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode with every fake-quant observer off (torch's fused moving-average fake-quant updates its
    range on every forward, even in eval); restored afterwards."""
    from torch.ao.quantization import FakeQuantizeBase

    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.observer_enabled.clone()) for m in model.modules()
             if isinstance(m, FakeQuantizeBase) and hasattr(m, "observer_enabled")]
    for m, _ in modes:
        m.training = False
    for m, _ in saved:
        m.disable_observer()
    try:
        yield model
    finally:
        for m, flag in saved:
            m.observer_enabled.copy_(flag)
        for m, mode in modes:
            m.training = mode


def torch_outputs(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    with frozen(model), torch.no_grad(), quiet():
        # clone: quantized kernels (qnnpack) may reuse an output buffer on the next call
        return [model(x).detach().float().clone().numpy() for x in inputs]


def ort_outputs(path: str | Path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x.numpy()})[0] for x in inputs]


def output_step(model: onnx.ModelProto) -> float:
    """The quantization step of the first graph output: the scale of the DequantizeLinear that produces it
    (through view ops)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = producers[model.graph.output[0].name]
    while node.op_type != "DequantizeLinear":
        node = producers[node.input[0]]
    return float(np.max(inits[node.input[1]]))


def fraction_within_steps(ref: list[np.ndarray], got: list[np.ndarray], step: float, steps: float = 1.0) -> float:
    """Fraction of output elements whose ONNX Runtime value is within ``steps`` quantization steps of torch's."""
    tol = steps * step * (1 + 1e-5) + 1e-7
    ok = sum(int((np.abs(r - g) <= tol).sum()) for r, g in zip(ref, got, strict=True))
    total = sum(r.size for r in ref)
    return ok / total


def parity_fraction(model: torch.nn.Module, path: str | Path, shape: tuple[int, ...], n: int = 2,
                    seed: int = 21) -> float:
    """Direct parity: torch (frozen observers) vs ONNX Runtime on ``n`` fresh batches, in output steps."""
    inputs = calibration_batches(shape, n, seed=seed)
    ref = torch_outputs(model, inputs)
    got = ort_outputs(path, inputs)
    return fraction_within_steps(ref, got, output_step(onnx.load(str(path))))


def op_types(path: str | Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
